//! Command-line client. Exit codes: 0 ok, 1 cas failed / key not found, 2 usage,
//! 3 cluster unavailable (or the command was rejected).

use ballot_node::client::{Client, ClientConfig, ClientError};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "ballot-cli",
    version,
    about = "Talk to a Ballot key-value cluster"
)]
struct Cli {
    /// Client addresses of the nodes, comma-separated (host:port,...).
    #[arg(long, value_delimiter = ',', required = true)]
    cluster: Vec<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 15)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sets KEY to VALUE.
    Put { key: String, value: String },
    /// Prints the value of KEY (exit 1 if absent).
    Get { key: String },
    /// Deletes KEY (exit 1 if absent).
    Delete { key: String },
    /// Sets KEY to NEW if it is OLD (exit 1 otherwise).
    Cas {
        key: String,
        old: String,
        new: String,
    },
    /// Shows every node's role, ballot, commit and applied index, compacted log prefix,
    /// newest checkpoint and state digest.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Asks every node of --cluster to take a checkpoint now (exit 0 if any accepted).
    Checkpoint,
}

fn unavailable(e: ClientError) -> ExitCode {
    eprintln!("ballot-cli: {e}");
    ExitCode::from(3)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let mut cfg = ClientConfig::new(cli.cluster);
    cfg.deadline = Duration::from_secs(cli.timeout.max(1));
    let mut c = Client::with_config(cfg);
    let mut out = std::io::stdout();
    match cli.cmd {
        Cmd::Put { key, value } => match c.put(key.as_bytes(), value.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => unavailable(e),
        },
        Cmd::Get { key } => match c.get(key.as_bytes()) {
            Ok(Some(v)) => {
                let _ = out.write_all(&v).and_then(|_| out.write_all(b"\n"));
                ExitCode::SUCCESS
            }
            Ok(None) => {
                eprintln!("ballot-cli: key not found");
                ExitCode::from(1)
            }
            Err(e) => unavailable(e),
        },
        Cmd::Delete { key } => match c.delete(key.as_bytes()) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => {
                eprintln!("ballot-cli: key not found");
                ExitCode::from(1)
            }
            Err(e) => unavailable(e),
        },
        Cmd::Cas { key, old, new } => {
            match c.cas(key.as_bytes(), Some(old.as_bytes()), new.as_bytes()) {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(cur)) => {
                    match cur {
                        Some(v) => eprintln!(
                            "ballot-cli: cas failed; current value: {}",
                            String::from_utf8_lossy(&v)
                        ),
                        None => eprintln!("ballot-cli: cas failed; key not found"),
                    }
                    ExitCode::from(1)
                }
                Err(e) => unavailable(e),
            }
        }
        Cmd::Status { json } => {
            let all = c.cluster_status();
            let any = all.iter().any(|(_, r)| r.is_ok());
            if json {
                let v: Vec<serde_json::Value> = all
                    .iter()
                    .map(|(a, r)| match r {
                        Ok(s) => serde_json::json!({"addr": a, "status": s}),
                        Err(e) => serde_json::json!({"addr": a, "error": e.to_string()}),
                    })
                    .collect();
                let _ = writeln!(out, "{}", serde_json::Value::Array(v));
            } else {
                for (a, r) in &all {
                    let _ = match r {
                        Ok(s) => writeln!(
                            out,
                            "{a} node={} role={} ballot={}.{} commit={} applied={} leader={} \
                             log_base={} checkpoint={} digest={:016x}@{}",
                            s.node,
                            s.role,
                            s.ballot_round,
                            s.ballot & 0xFF,
                            s.commit,
                            s.applied,
                            s.leader.map_or("-".to_string(), |l| l.to_string()),
                            s.log_base,
                            s.checkpoint,
                            s.digest,
                            s.digest_index
                        ),
                        Err(e) => writeln!(out, "{a} unreachable: {e}"),
                    };
                }
            }
            if any {
                ExitCode::SUCCESS
            } else {
                eprintln!("ballot-cli: no node answered");
                ExitCode::from(3)
            }
        }
        Cmd::Checkpoint => {
            let all = c.cluster_checkpoint();
            for (a, r) in &all {
                let _ = match r {
                    Ok(()) => writeln!(out, "{a} checkpoint requested"),
                    Err(e) => writeln!(out, "{a} unreachable: {e}"),
                };
            }
            if all.iter().any(|(_, r)| r.is_ok()) {
                ExitCode::SUCCESS
            } else {
                eprintln!("ballot-cli: no node answered");
                ExitCode::from(3)
            }
        }
    }
}
