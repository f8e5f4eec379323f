//! A stream pipeline: reads topic `pipeline-in` for the stream group `pipeline`,
//! upper-cases each value, and produces it to the same partition of `pipeline-out` with
//! an idempotent producer. It commits a batch's input positions only once every record
//! made from it is acknowledged, so a crash of the pipeline re-reads at most what it had
//! not passed on (and the idempotent producer keeps a resent batch from being stored
//! twice). A broker restart needs nothing from it: the client reconnects, the producer
//! resends what was not acknowledged, and the consumer reads on from its positions.
//!
//! ```text
//! cargo run --example producer -- 127.0.0.1:9740 1000 pipeline-in
//! cargo run --example pipeline -- [ADDRESS] [COUNT]
//! ```
//! Defaults: `127.0.0.1:9740`, 1000 records: it stops once it has passed on COUNT
//! records (finishing the batch it is in). Both topics are created (4 partitions) if
//! they do not exist.

use std::process::ExitCode;

use futures_util::StreamExt;
use shardq::client::{
    Client, ClientError, ConsumedRecord, Consumer, ConsumerConfig, ErrorCode, Producer,
    ProducerConfig, ProducerRecord, StartPosition,
};

const INPUT: &str = "pipeline-in";
const OUTPUT: &str = "pipeline-out";

#[tokio::main]
async fn main() -> ExitCode {
    let mut arguments = std::env::args().skip(1);
    let address = arguments.next().unwrap_or_else(|| "127.0.0.1:9740".into());
    let Some(count) = arguments
        .next()
        .map_or(Some(1000), |count| count.parse().ok())
    else {
        eprintln!("usage: pipeline [ADDRESS] [COUNT]");
        return ExitCode::from(2);
    };
    match pipeline(&address, count).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pipeline: {}", error.report());
            ExitCode::FAILURE
        }
    }
}

async fn pipeline(address: &str, count: u64) -> Result<(), ClientError> {
    let client = Client::connect(address).await?;
    for topic in [INPUT, OUTPUT] {
        match client.create_topic(topic, 4).await {
            Err(error) if error.wire_code() == Some(ErrorCode::TopicAlreadyExists) => {}
            other => other?,
        }
    }
    // Idempotent is the default: a batch resent after a lost answer is stored once.
    let producer = Producer::new(client.clone(), ProducerConfig::default())?;
    let config = ConsumerConfig::builder().group("pipeline").build()?;
    let mut consumer = Consumer::new(client, config)?;
    consumer
        .assign_topic(INPUT, StartPosition::Beginning)
        .await?;
    let mut passed_on = 0;
    let mut batches = consumer.batches();
    while passed_on < count {
        let Some(batch) = batches.next().await else {
            break;
        };
        let batch = batch?;
        for record in &batch {
            producer.send(OUTPUT, transform(record)).await?;
        }
        // Every record of the batch acknowledged, or the first error (nothing committed).
        producer.flush().await?;
        batches.consumer().commit().await?;
        passed_on += batch.len() as u64;
    }
    producer.close().await?;
    println!("passed on {passed_on} records from {INPUT} to {OUTPUT}");
    Ok(())
}

/// The same partition (so per-partition order carries over), key and headers; the value
/// upper-cased.
fn transform(record: &ConsumedRecord) -> ProducerRecord {
    let mut output =
        ProducerRecord::new(record.value().to_ascii_uppercase()).with_partition(record.partition());
    if let Some(key) = record.key() {
        output = output.with_key(key.clone());
    }
    for (name, value) in record.headers() {
        output = output.with_header(name.clone(), value.clone());
    }
    output
}
