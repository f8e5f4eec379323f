//! A worker of queue group `workers` on TOPIC: `QueueConsumer::run` leases messages,
//! runs the handler on each (up to 16 at once), acks what succeeds and nacks what fails,
//! extending leases of slow handlers. For the example, every tenth message fails on its
//! first delivery, so the broker delivers it again after the topic's retry backoff (1 s
//! by default). The worker stops once COUNT messages were acked, or on Ctrl-C.
//!
//! ```text
//! cargo run --example producer -- 127.0.0.1:9740 100 jobs   # 100 jobs to work on
//! cargo run --example queue_worker -- [ADDRESS] [COUNT] [TOPIC]
//! ```
//! Defaults: `127.0.0.1:9740`, 100 messages, topic `jobs` (created with 4 partitions if
//! it does not exist).

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use shardq::client::{Client, ClientError, ErrorCode, QueueConsumer, QueueMessage};
use tokio::sync::Notify;

#[tokio::main]
async fn main() -> ExitCode {
    let mut arguments = std::env::args().skip(1);
    let address = arguments.next().unwrap_or_else(|| "127.0.0.1:9740".into());
    let Some(count) = arguments
        .next()
        .map_or(Some(100), |count| count.parse().ok())
    else {
        eprintln!("usage: queue_worker [ADDRESS] [COUNT] [TOPIC]");
        return ExitCode::from(2);
    };
    let topic = arguments.next().unwrap_or_else(|| "jobs".into());
    match work(&address, count, &topic).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("queue_worker: {}", error.report());
            ExitCode::FAILURE
        }
    }
}

async fn work(address: &str, count: u64, topic: &str) -> Result<(), ClientError> {
    let client = Client::connect(address).await?;
    match client.create_topic(topic, 4).await {
        Err(error) if error.wire_code() == Some(ErrorCode::TopicAlreadyExists) => {}
        other => other?,
    }
    let worker = QueueConsumer::builder(client, topic, "workers")
        .handler_concurrency_max(16)
        .build()?;
    let succeeded = Arc::new(AtomicU64::new(0));
    let enough = Arc::new(Notify::new());
    let handler = {
        let (succeeded, enough) = (succeeded.clone(), enough.clone());
        move |message: QueueMessage| {
            let (succeeded, enough) = (succeeded.clone(), enough.clone());
            async move {
                handle(&message)?;
                if succeeded.fetch_add(1, Ordering::Relaxed) + 1 == count {
                    enough.notify_one();
                }
                Ok::<(), String>(())
            }
        }
    };
    // Stops receiving when either fires, lets running handlers finish and settles them.
    let shutdown = async {
        tokio::select! {
            _ = enough.notified() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let summary = worker.run(handler, shutdown).await?;
    println!(
        "received {} acked {} nacked {} extended {} refused {}",
        summary.received, summary.acked, summary.nacked, summary.extended, summary.refused
    );
    Ok(())
}

/// The work: here, printing. An `Err` nacks the message with the text as its reason.
fn handle(message: &QueueMessage) -> Result<(), String> {
    if message.offset() % 10 == 0 && message.attempt() == 1 {
        return Err(format!(
            "offset {} fails its first delivery",
            message.offset()
        ));
    }
    println!(
        "{}:{} attempt {}: {}",
        message.partition(),
        message.offset(),
        message.attempt(),
        String::from_utf8_lossy(message.value())
    );
    Ok(())
}
