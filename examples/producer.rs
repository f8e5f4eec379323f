//! Produces COUNT records to TOPIC with the batching, idempotent producer and prints
//! where the last one landed. The topic is created (4 partitions) if it does not exist.
//!
//! ```text
//! cargo run --release -- serve                      # in another terminal
//! cargo run --example producer -- [ADDRESS] [COUNT] [TOPIC]
//! ```
//! Defaults: `127.0.0.1:9740`, 1000 records, topic `example`. Each record is keyed by
//! one of 8 keys, so the records of one key keep their order (one partition per key).
//! This file is the produce half of the README's client program.

use std::process::ExitCode;

use shardq::client::{Client, ClientError, ErrorCode, Producer, ProducerConfig, ProducerRecord};

#[tokio::main]
async fn main() -> ExitCode {
    let mut arguments = std::env::args().skip(1);
    let address = arguments.next().unwrap_or_else(|| "127.0.0.1:9740".into());
    let Some(count) = arguments
        .next()
        .map_or(Some(1000), |count| count.parse().ok())
    else {
        eprintln!("usage: producer [ADDRESS] [COUNT] [TOPIC]");
        return ExitCode::from(2);
    };
    let topic = arguments.next().unwrap_or_else(|| "example".into());
    match produce(&address, count, &topic).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("producer: {}", error.report());
            ExitCode::FAILURE
        }
    }
}

async fn produce(address: &str, count: u64, topic: &str) -> Result<(), ClientError> {
    let client = Client::connect(address).await?;
    match client.create_topic(topic, 4).await {
        Err(error) if error.wire_code() == Some(ErrorCode::TopicAlreadyExists) => {}
        other => other?,
    }
    let producer = Producer::new(client, ProducerConfig::default())?;
    let mut last = None;
    for index in 0..count {
        let record =
            ProducerRecord::new(format!("record {index}")).with_key(format!("key-{}", index % 8));
        // Returns once the record is queued in its partition's batch (waiting only for
        // buffer memory, and for metadata the first time).
        last = Some(producer.send(topic, record).await?);
    }
    // Sends what is still lingering, waits for every answer, refuses later sends.
    producer.close().await?;
    if let Some(handle) = last {
        let metadata = handle.wait().await?;
        println!(
            "produced {count} records to {topic}; the last at partition {} offset {}",
            metadata.partition, metadata.offset
        );
    } else {
        println!("produced 0 records to {topic}");
    }
    Ok(())
}
