//! Reads TOPIC as a `Stream` of records for the stream group `example-group`, committing
//! as it goes, and stops after COUNT records. Run it twice: the second run resumes where
//! the first committed.
//!
//! ```text
//! cargo run --example consumer -- [ADDRESS] [COUNT] [TOPIC]
//! ```
//! Defaults: `127.0.0.1:9740`, 1000 records, topic `example` (written by the `producer`
//! example). This file is the consume half of the README's client program.

use std::process::ExitCode;

use futures_util::StreamExt;
use shardq::client::{Client, ClientError, Consumer, ConsumerConfig, StartPosition};

#[tokio::main]
async fn main() -> ExitCode {
    let mut arguments = std::env::args().skip(1);
    let address = arguments.next().unwrap_or_else(|| "127.0.0.1:9740".into());
    let Some(count) = arguments
        .next()
        .map_or(Some(1000), |count| count.parse().ok())
    else {
        eprintln!("usage: consumer [ADDRESS] [COUNT] [TOPIC]");
        return ExitCode::from(2);
    };
    let topic = arguments.next().unwrap_or_else(|| "example".into());
    match consume(&address, count, &topic).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("consumer: {}", error.report());
            ExitCode::FAILURE
        }
    }
}

async fn consume(address: &str, count: u64, topic: &str) -> Result<(), ClientError> {
    let client = Client::connect(address).await?;
    let config = ConsumerConfig::builder().group("example-group").build()?;
    let mut consumer = Consumer::new(client, config)?;
    // Each partition starts at the group's committed offset, or at the beginning where
    // the group never committed.
    consumer
        .assign_topic(topic, StartPosition::Beginning)
        .await?;
    let mut consumed = 0;
    while consumed < count {
        // `None` only when nothing is assigned or the client was closed.
        let Some(record) = consumer.next().await else {
            break;
        };
        let record = record?;
        println!(
            "{}/{} {}: {}",
            record.topic(),
            record.partition(),
            record.offset(),
            String::from_utf8_lossy(record.value())
        );
        consumed += 1;
        if consumed % 100 == 0 {
            // Everything handed out so far: at most 100 records are read again after a
            // crash.
            consumer.commit().await?;
        }
    }
    consumer.commit().await?;
    consumer.refresh_watermarks().await?;
    let lag = consumer.total_lag().unwrap_or(0);
    println!("consumed {consumed} records of {topic}; lag {lag}");
    Ok(())
}
