//! The Grafana dashboard (tuning/grafana/shardq.json) against the broker's real /metrics:
//! every `shardq_*` series a panel or template variable queries must be a family in
//! `shardq::metrics::FAMILIES` (histograms only through `_bucket`, `_sum`, `_count`),
//! filter only on labels that family has, and show up in a live scrape after a workload
//! that touches every family; every family must be on the dashboard.
//!
//! A renamed metric, a typo in a query, or a new family without a panel fails here, not
//! in front of an operator looking at an empty graph.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::client::{records_until, STEP_TIMEOUT};
use common::{batch_of, test_config, TestBroker};
use shardq::client::{Acks, Client, NackDelay, QueueConsumer, QueueSettings, Retention};
use shardq::metrics::{family_of, Kind, FAMILIES};
use shardq::protocol::{ErrorCode, ProducePartition, ProduceRequest, ProduceTopic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/grafana/shardq.json");

/// Labels a selector may filter on besides its family's own: every sample's `shard`, and
/// the `instance` and `job` Prometheus adds when it scrapes. (A `_bucket` series also has
/// `le`.)
const ADDED_LABELS: &[&str] = &["shard", "instance", "job"];

/// Bounds one scrape (the endpoint itself times out idle clients after 5 s).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
const SCRAPE_BYTES_MAX: usize = 16 << 20;

#[tokio::test]
async fn every_series_the_dashboard_queries_is_exported_by_a_live_broker() {
    let queries = dashboard_queries();
    let used = series_in(&queries);

    // The names themselves, before any broker runs.
    let mut problems = Vec::new();
    for (series, selector_labels) in &used {
        match family_of_series(series) {
            Err(problem) => problems.push(problem),
            Ok(family) => {
                for label in selector_labels {
                    let allowed = family.labels.contains(&label.as_str())
                        || ADDED_LABELS.contains(&label.as_str())
                        || (label == "le" && series.ends_with("_bucket"));
                    if !allowed {
                        let labels: Vec<&str> = ["shard"]
                            .into_iter()
                            .chain(family.labels.iter().copied())
                            .collect();
                        problems.push(format!(
                            "{series} is filtered on `{label}`, which {} does not have \
                             (its labels: {})",
                            family.name,
                            labels.join(", ")
                        ));
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{DASHBOARD} queries series the broker does not export as written:\n  {}",
        problems.join("\n  ")
    );
    let families_used: BTreeSet<&str> = used
        .keys()
        .filter_map(|series| family_of_series(series).ok())
        .map(|family| family.name)
        .collect();
    let not_shown: Vec<&str> = FAMILIES
        .iter()
        .map(|family| family.name)
        .filter(|name| !families_used.contains(name))
        .collect();
    assert!(
        not_shown.is_empty(),
        "families with no panel on {DASHBOARD}: {not_shown:?}"
    );

    // A workload that makes every family show up, then one scrape.
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(shardq::config::ServerConfig {
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..test_config(dir.path(), 2)
    });
    let metrics_addr = broker
        .handle
        .as_ref()
        .expect("running")
        .metrics_addr
        .expect("metrics_listen was set");
    let client = Client::connect(broker.addr()).await.unwrap();
    run_workload(&client).await;
    // acks=none has no answer to wait for: its failure is counted once the broker has
    // handled the request, so scrape until it shows up (bounded).
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    let text = loop {
        let text = scrape(metrics_addr, "/metrics").await;
        if sample_names(&text).contains("shardq_acks_none_failures_total") {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the acks=none produce to an unknown topic was not counted within \
             {STEP_TIMEOUT:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let live = sample_names(&text);
    let missing: Vec<&str> = used
        .keys()
        .map(String::as_str)
        .filter(|series| !live.contains(*series))
        .collect();
    assert!(
        missing.is_empty(),
        "series the dashboard queries that a live broker did not export after the \
         workload: {missing:?}\n--- /metrics ---\n{text}"
    );
    // The workload really happened (not just handles registered at start-up).
    for (series, labels) in [
        ("shardq_errors_total", "code=\"unknown_topic\""),
        ("shardq_acks_none_failures_total", "code=\"unknown_topic\""),
        ("shardq_queue_redelivered_total", "group=\"workers\""),
        ("shardq_group_lag_records", "kind=\"stream\""),
    ] {
        assert!(
            text.lines()
                .any(|line| line.starts_with(series) && line.contains(labels)),
            "no {series} sample with {labels}:\n{text}"
        );
    }
}

/// Produce with every acks level, fetch, a queue group's receive + ack + nack (and the
/// redelivery), a stream group's commit, and produces to an unknown topic with acks
/// durable and none.
async fn run_workload(client: &Client) {
    // Four partitions over two shards: both own some, so both have storage histograms,
    // and topic creation crosses the mesh.
    client.create_topic("events", 4).await.unwrap();
    for partition in 0..4 {
        produce(client, "events", partition, Acks::Durable, &[b"durable"]).await;
    }
    produce(client, "events", 0, Acks::Memory, &[b"memory"]).await;
    produce(client, "events", 1, Acks::None, &[b"none"]).await;
    // Fetches, which also wait out the records acked in memory or not at all.
    for (partition, count) in [(0, 2), (1, 2), (2, 1), (3, 1)] {
        records_until(client, "events", partition, count).await;
    }

    client
        .commit_offsets("readers", "events", &[(0, 1), (1, 1)])
        .await
        .unwrap();

    client
        .create_topic_with_queue("jobs", 1, Retention::default(), QueueSettings::default())
        .await
        .unwrap();
    produce(client, "jobs", 0, Acks::Durable, &[b"one", b"two"]).await;
    let consumer = QueueConsumer::builder(client.clone(), "jobs", "workers")
        .visibility_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let messages = receive_count(&consumer, 2).await;
    let acked = consumer.ack(&[messages[0].handle()]).await.unwrap();
    assert!(acked.is_success(), "{:?}", acked.refused);
    let nacked = consumer
        .nack(&[messages[1].handle()], NackDelay::Ms(0), "once more")
        .await
        .unwrap();
    assert!(nacked.is_success(), "{:?}", nacked.refused);
    let again = receive_count(&consumer, 1).await;
    assert_eq!(again[0].attempt(), 2, "the nacked message came back");
    let acked = consumer.ack(&[again[0].handle()]).await.unwrap();
    assert!(acked.is_success(), "{:?}", acked.refused);

    let response = client
        .produce(produce_request("no-such-topic", 0, Acks::Durable, &[b"x"]))
        .await
        .unwrap()
        .expect("acks durable is answered");
    let error = response.topics[0].partitions[0]
        .result
        .clone()
        .expect_err("the topic does not exist");
    assert_eq!(error.code, ErrorCode::UnknownTopic);
    let answer = client
        .produce(produce_request("no-such-topic", 0, Acks::None, &[b"x"]))
        .await
        .unwrap();
    assert!(answer.is_none(), "acks none is never answered");
}

fn produce_request(topic: &str, partition: u32, acks: Acks, values: &[&[u8]]) -> ProduceRequest {
    ProduceRequest {
        acks,
        timeout_ms: 10_000,
        topics: vec![ProduceTopic {
            name: topic.into(),
            partitions: vec![ProducePartition {
                partition,
                batch: batch_of(values),
            }],
        }],
    }
}

async fn produce(client: &Client, topic: &str, partition: u32, acks: Acks, values: &[&[u8]]) {
    let answer = client
        .produce(produce_request(topic, partition, acks, values))
        .await
        .unwrap();
    if let Some(response) = answer {
        let result = &response.topics[0].partitions[0].result;
        assert!(result.is_ok(), "produce to {topic}/{partition}: {result:?}");
    }
}

/// Receives until `count` messages came back, long-polling; panics after STEP_TIMEOUT.
async fn receive_count(
    consumer: &QueueConsumer,
    count: usize,
) -> Vec<shardq::client::QueueMessage> {
    let receive = async {
        let mut messages = Vec::new();
        while messages.len() < count {
            let wanted = (count - messages.len()) as u32;
            let more = consumer
                .receive(wanted, None, Duration::from_secs(5))
                .await
                .unwrap();
            messages.extend(more);
        }
        messages
    };
    tokio::time::timeout(STEP_TIMEOUT, receive)
        .await
        .unwrap_or_else(|_| panic!("fewer than {count} messages were received"))
}

/// A plain HTTP/1.1 GET; the body of a 200 answer (the endpoint closes every
/// connection after its answer, so the body is the rest of the stream).
async fn scrape(addr: SocketAddr, path: &str) -> String {
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        (&mut stream)
            .take(SCRAPE_BYTES_MAX as u64 + 1)
            .read_to_end(&mut answer)
            .await
            .unwrap();
        answer
    };
    let answer = tokio::time::timeout(SCRAPE_TIMEOUT, get)
        .await
        .unwrap_or_else(|_| panic!("GET {path} from {addr} took over {SCRAPE_TIMEOUT:?}"));
    assert!(
        answer.len() <= SCRAPE_BYTES_MAX,
        "GET {path} answered over {SCRAPE_BYTES_MAX} bytes"
    );
    let answer = String::from_utf8(answer).expect("the text format is UTF-8");
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {answer:?}"));
    assert!(
        head.starts_with("HTTP/1.1 200 "),
        "GET {path} answered {head}"
    );
    body.to_owned()
}

/// The series names of a scrape's samples (`_bucket`, `_sum`, `_count` as written).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            line[..end].to_owned()
        })
        .collect()
}

/// Every PromQL query on the dashboard: each panel's targets' `expr` (rows' nested
/// panels included) and each query template variable's query.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(DASHBOARD)
        .unwrap_or_else(|error| panic!("reading {DASHBOARD}: {error}"));
    let dashboard: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("{DASHBOARD} is not JSON: {error}"));
    let mut queries = Vec::new();
    let panels = dashboard["panels"].as_array().expect("a panels array");
    assert!(!panels.is_empty(), "{DASHBOARD} has no panels");
    let mut pending: Vec<&serde_json::Value> = panels.iter().collect();
    while let Some(panel) = pending.pop() {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        if panel["type"] == "row" {
            pending.extend(panel["panels"].as_array().into_iter().flatten());
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {title:?} does not use the datasource variable"
        );
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {title:?} has no queries");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("a target of panel {title:?} has no expr"));
            assert!(
                expr.contains("shardq_"),
                "panel {title:?} queries no shardq series: {expr}"
            );
            queries.push(expr.to_owned());
        }
    }
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("a templating list");
    let names: BTreeSet<&str> = variables
        .iter()
        .filter_map(|variable| variable["name"].as_str())
        .collect();
    assert!(
        variables
            .iter()
            .any(|variable| variable["name"] == "datasource" && variable["type"] == "datasource"),
        "{DASHBOARD} has no datasource variable"
    );
    for variable in variables
        .iter()
        .filter(|variable| variable["type"] == "query")
    {
        let query = match &variable["query"] {
            serde_json::Value::String(query) => query.as_str(),
            object => object["query"].as_str().expect("a variable's query"),
        };
        queries.push(query.to_owned());
    }
    // Every $variable a query uses is defined (Grafana's own `$__…` ones aside).
    for query in &queries {
        for (index, _) in query.match_indices('$') {
            let name: String = query[index + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                name.starts_with("__") || names.contains(name.as_str()),
                "`${name}` is not a template variable of {DASHBOARD}: {query}"
            );
        }
    }
    queries
}

/// Every `shardq_*` series the queries name, with the labels its selectors filter on.
fn series_in(queries: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for query in queries {
        let mut rest = query.as_str();
        while let Some(start) = rest.find("shardq_") {
            let tail = &rest[start..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let labels = series.entry(tail[..end].to_owned()).or_default();
            rest = &tail[end..];
            if let Some(matchers) = rest.strip_prefix('{') {
                let close = matchers
                    .find('}')
                    .unwrap_or_else(|| panic!("an unclosed selector in {query}"));
                for matcher in matchers[..close].split(',') {
                    let name = matcher
                        .split(['=', '!'])
                        .next()
                        .expect("split yields one piece")
                        .trim();
                    if !name.is_empty() {
                        labels.insert(name.to_owned());
                    }
                }
                rest = &matchers[close..];
            }
        }
    }
    assert!(!series.is_empty(), "no shardq series on {DASHBOARD}");
    series
}

/// The family a series belongs to: a counter or gauge by its own name, a histogram
/// through its `_bucket`, `_sum` or `_count` series.
fn family_of_series(series: &str) -> Result<&'static shardq::metrics::Family, String> {
    if let Some(family) = family_of(series) {
        return match family.kind {
            Kind::Histogram => Err(format!(
                "{series} is a histogram: query {series}_bucket, _sum or _count"
            )),
            _ => Ok(family),
        };
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(family) = series.strip_suffix(suffix).and_then(family_of) {
            if family.kind == Kind::Histogram {
                return Ok(family);
            }
        }
    }
    Err(format!("{series} is not in shardq::metrics::FAMILIES"))
}
