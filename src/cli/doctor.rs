//! `shardq doctor`: the preflight checks of `shardq::server::preflight` as a table (or
//! JSON with `--json`), for the broker `serve` would run with the same flags.
//!
//! Exit status: 0 when no check failed (warnings allowed), 1 when any did. It takes what
//! `serve` takes (`--config`, `--set`, `SHARDQ_*`, the flags) and checks the
//! `ServerConfig` they come to; one `serve` would refuse is the `config` check's failure.

use clap::Args;
use serde_json::{json, Value};

use shardq::server::preflight::{run_checks, Check, Status};

use super::{write_stdout, CliError, ServeArgs};

/// What `serve` takes, and `--json`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The broker to check, described as `serve` takes it: `--config FILE`, `--set`,
    /// `SHARDQ_*` and the same flags, with the same precedence.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Print one JSON document with every check instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: DoctorArgs) -> Result<(), CliError> {
    let config = super::config::unvalidated_serve_config(args.serve)?;
    let checks = run_checks(&config);
    let text = if args.json {
        let mut document = serde_json::to_string_pretty(&to_json(&checks))
            .expect("a JSON value always serializes");
        document.push('\n');
        document
    } else {
        table(&checks)
    };
    write_stdout(&text)?;
    let failed = count(&checks, Status::Fail);
    if failed > 0 {
        return Err(CliError::ChecksFailed { failed });
    }
    Ok(())
}

fn count(checks: &[Check], status: Status) -> usize {
    checks.iter().filter(|check| check.status == status).count()
}

/// `{"checks": [{"name", "status", "found", "action"}], "passed", "warnings", "failed"}`;
/// `action` is null for a pass.
fn to_json(checks: &[Check]) -> Value {
    json!({
        "checks": checks
            .iter()
            .map(|check| json!({
                "name": check.name,
                "status": check.status.as_str(),
                "found": check.found,
                "action": check.action,
            }))
            .collect::<Vec<_>>(),
        "passed": count(checks, Status::Pass),
        "warnings": count(checks, Status::Warn),
        "failed": count(checks, Status::Fail),
    })
}

/// One line per check (name, status, what was found), and under a warning or failure an
/// indented line saying what to do; a summary line last.
fn table(checks: &[Check]) -> String {
    let name_width = checks
        .iter()
        .map(|check| check.name.len())
        .max()
        .unwrap_or(0)
        .max("CHECK".len());
    let mut text = format!("{:name_width$}  STATUS  FOUND\n", "CHECK");
    for check in checks {
        text.push_str(&format!(
            "{:name_width$}  {:6}  {}\n",
            check.name,
            check.status.as_str(),
            check.found
        ));
        if let Some(action) = &check.action {
            text.push_str(&format!("{:name_width$}          fix: {action}\n", ""));
        }
    }
    text.push_str(&format!(
        "{} passed, {} warnings, {} failed\n",
        count(checks, Status::Pass),
        count(checks, Status::Warn),
        count(checks, Status::Fail)
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Check> {
        vec![
            Check {
                name: "kernel",
                status: Status::Pass,
                found: "Linux 6.18".into(),
                action: None,
            },
            Check {
                name: "swappiness",
                status: Status::Warn,
                found: "vm.swappiness = 60".into(),
                action: Some("sysctl vm.swappiness=1".into()),
            },
            Check {
                name: "listen",
                status: Status::Fail,
                found: "127.0.0.1:9740 is in use".into(),
                action: Some("stop it".into()),
            },
        ]
    }

    #[test]
    fn table_shows_each_status_and_a_fix_only_under_warnings_and_failures() {
        let text = table(&sample());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("CHECK"), "{text}");
        assert!(lines[1].starts_with("kernel") && lines[1].contains("pass"));
        assert!(lines[2].starts_with("swappiness") && lines[2].contains("warn"));
        assert!(lines[3].contains("fix: sysctl vm.swappiness=1"), "{text}");
        assert!(lines[4].starts_with("listen") && lines[4].contains("fail"));
        assert!(lines[5].contains("fix: stop it"), "{text}");
        assert_eq!(lines[6], "1 passed, 1 warnings, 1 failed");
        assert_eq!(lines.len(), 7, "{text}");
    }

    #[test]
    fn json_lists_every_check_with_a_null_action_on_a_pass() {
        let document = to_json(&sample());
        let checks = document["checks"].as_array().unwrap();
        assert_eq!(checks.len(), 3);
        assert_eq!(checks[0]["name"], "kernel");
        assert_eq!(checks[0]["action"], Value::Null);
        assert_eq!(checks[2]["status"], "fail");
        assert_eq!(document["failed"], 1);
        assert_eq!(document["warnings"], 1);
        assert_eq!(document["passed"], 1);
    }
}
