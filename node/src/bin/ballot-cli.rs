//! Command-line client, in the manner of etcdctl: global `--endpoints` (or
//! `BALLOT_ENDPOINTS`), `--json`, `--timeout`; exit codes in [`EXIT_CODES`].

use ballot_node::client::{parse_endpoint, Client, ClientConfig, ClientError};
use ballot_node::error::NodeError;
use ballot_node::kv::{MAX_KEY, MAX_VALUE};
use ballot_node::wire::NodeStatus;
use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

const EXIT_CODES: &str = "\
Exit codes:
  0  ok
  1  refused: key not found, cas did not match, command rejected by the cluster
  2  usage: bad flags, bad endpoint, bad input (key or value too large, unreadable file)
  3  unavailable: no endpoint reachable, no leader, no answer within --timeout,
     or (health) some node unhealthy

Endpoints are the nodes' client addresses: host:port or id=host:port (as in
--client-peers), comma-separated, from --endpoints or BALLOT_ENDPOINTS.
With --json every result is one JSON object on one line (see docs/operations.md).";

const OK: u8 = 0;
const REFUSED: u8 = 1;
const USAGE: u8 = 2;
const UNAVAILABLE: u8 = 3;

#[derive(Parser)]
#[command(
    name = "ballot-cli",
    version = ballot::version::VERSION,
    about = "Talk to a Ballot key-value cluster",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Client addresses of the nodes, comma-separated: host:port or id=host:port.
    #[arg(
        long,
        global = true,
        alias = "cluster",
        env = "BALLOT_ENDPOINTS",
        hide_env_values = true,
        value_delimiter = ',',
        value_name = "ENDPOINTS",
        value_parser = parse_endpoint
    )]
    endpoints: Vec<String>,
    /// Give up on a command after this many seconds.
    #[arg(long, global = true, default_value_t = 5, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// Print each result as one JSON object per line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sets KEY to VALUE (`-`: read VALUE from stdin).
    Put {
        key: String,
        #[arg(required_unless_present = "value_file")]
        value: Option<String>,
        /// Read the value from this file (exactly its bytes).
        #[arg(long, value_name = "PATH", conflicts_with = "value")]
        value_file: Option<PathBuf>,
    },
    /// Prints the value of KEY (exit 1 if absent).
    Get { key: String },
    /// Deletes KEY (exit 1 if absent).
    Delete { key: String },
    /// Sets KEY to NEW if its value is OLD; with --absent, creates KEY with NEW only if it
    /// does not exist. Exit 1 (and the current value) if it did not match.
    #[command(override_usage = "ballot-cli cas [OPTIONS] KEY OLD NEW\n       \
                                ballot-cli cas [OPTIONS] --absent KEY NEW\n       \
                                ballot-cli cas [OPTIONS] KEY OLD --value-file PATH")]
    Cas {
        key: String,
        /// OLD NEW, or NEW alone with --absent (`-` as NEW: read it from stdin).
        #[arg(value_name = "OLD|NEW", num_args = 0..=2)]
        values: Vec<String>,
        /// Expect KEY to be absent (instead of an OLD value).
        #[arg(long)]
        absent: bool,
        /// Read NEW from this file.
        #[arg(long, value_name = "PATH")]
        value_file: Option<PathBuf>,
    },
    /// Shows every node's role, ballot, commit and applied index, compacted log prefix,
    /// newest checkpoint and state digest (exit 0 if any node answered).
    Status,
    /// Checks the cluster: exit 0 only if every listed node answers, none is recovering,
    /// and a leader is known; else exit 3 naming each node at fault.
    Health,
    /// Asks every listed node to take a checkpoint now (exit 0 if any accepted).
    Checkpoint,
}

/// A usage error found after parsing (bad input), printed the way clap prints its own.
fn usage(msg: impl std::fmt::Display) -> u8 {
    let _ = Cli::command()
        .error(clap::error::ErrorKind::ValueValidation, msg)
        .print();
    USAGE
}

fn say(json: bool, v: Value, text: impl FnOnce() -> String) {
    let mut out = std::io::stdout().lock();
    let _ = if json {
        writeln!(out, "{v}")
    } else {
        writeln!(out, "{}", text())
    };
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { USAGE } else { OK });
        }
    };
    ExitCode::from(run(cli))
}

fn run(cli: Cli) -> u8 {
    if cli.endpoints.is_empty() {
        return usage("no endpoints: give --endpoints host:port,... or set BALLOT_ENDPOINTS");
    }
    let mut cfg = ClientConfig::new(cli.endpoints);
    cfg.deadline = Duration::from_secs(cli.timeout);
    cfg.fail_fast = true;
    let mut c = Client::with_config(cfg);
    let json = cli.json;
    match cli.cmd {
        Cmd::Put {
            key,
            value,
            value_file,
        } => {
            let v = match check_key(&key)
                .and_then(|()| read_value(value.as_deref(), value_file.as_deref()))
            {
                Ok(v) => v,
                Err(e) => return usage(e),
            };
            match c.put(key.as_bytes(), &v) {
                Ok(()) => {
                    say(json, json!({"key": key, "ok": true}), || "OK".into());
                    OK
                }
                Err(e) => failed(&c, e),
            }
        }
        Cmd::Get { key } => {
            if let Err(e) = check_key(&key) {
                return usage(e);
            }
            match c.get(key.as_bytes()) {
                Ok(Some(v)) => {
                    if json {
                        let mut o = json!({"key": key, "found": true});
                        put_value(&mut o, "value", &v);
                        say(true, o, String::new);
                    } else {
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(&v).and_then(|_| out.write_all(b"\n"));
                    }
                    OK
                }
                Ok(None) => not_found(json, &key),
                Err(e) => failed(&c, e),
            }
        }
        Cmd::Delete { key } => {
            if let Err(e) = check_key(&key) {
                return usage(e);
            }
            match c.delete(key.as_bytes()) {
                Ok(true) => {
                    say(json, json!({"key": key, "deleted": true}), || "OK".into());
                    OK
                }
                Ok(false) => not_found(json, &key),
                Err(e) => failed(&c, e),
            }
        }
        Cmd::Cas {
            key,
            values,
            absent,
            value_file,
        } => cas(&mut c, json, &key, values, absent, value_file.as_deref()),
        Cmd::Status => status(&c, json),
        Cmd::Health => health(&c, json),
        Cmd::Checkpoint => each_endpoint(json, &c.cluster_checkpoint(), |a, ()| {
            say(json, json!({"endpoint": a, "requested": true}), || {
                format!("{a} checkpoint requested")
            })
        }),
    }
}

fn cas(
    c: &mut Client,
    json: bool,
    key: &str,
    values: Vec<String>,
    absent: bool,
    file: Option<&Path>,
) -> u8 {
    let want = usize::from(!absent) + usize::from(file.is_none());
    if values.len() != want {
        return usage(match (absent, file.is_some()) {
            (false, false) => "cas needs KEY OLD NEW",
            (false, true) => "cas with --value-file needs KEY OLD",
            (true, false) => "cas --absent needs KEY NEW",
            (true, true) => "cas --absent with --value-file needs KEY only",
        });
    }
    let (old, new) = if absent {
        (None, values.first())
    } else {
        (values.first(), values.get(1))
    };
    let new = match check_key(key).and_then(|()| read_value(new.map(String::as_str), file)) {
        Ok(v) => v,
        Err(e) => return usage(e),
    };
    if old.is_some_and(|o| o.len() > MAX_VALUE) {
        return usage(format!(
            "OLD is longer than the {MAX_VALUE}-byte value limit"
        ));
    }
    match c.cas(key.as_bytes(), old.map(String::as_bytes), &new) {
        Ok(Ok(())) => {
            say(json, json!({"key": key, "swapped": true}), || "OK".into());
            OK
        }
        Ok(Err(cur)) => {
            let mut o = json!({"key": key, "swapped": false, "found": cur.is_some()});
            if let Some(v) = &cur {
                put_value(&mut o, "current", v);
            }
            if json {
                say(true, o, String::new);
            }
            match &cur {
                Some(v) => eprintln!(
                    "ballot-cli: cas failed; current value: {}",
                    String::from_utf8_lossy(v)
                ),
                None => eprintln!("ballot-cli: cas failed; key not found"),
            }
            REFUSED
        }
        Err(e) => failed(c, e),
    }
}

fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(format!(
            "a key is 1 to {MAX_KEY} bytes, not {} bytes",
            key.len()
        ));
    }
    Ok(())
}

/// The value: `arg` itself, stdin if `arg` is `-`, or the contents of `file`.
fn read_value(arg: Option<&str>, file: Option<&Path>) -> Result<Vec<u8>, String> {
    let v = match (arg, file) {
        (_, Some(p)) => {
            std::fs::read(p).map_err(|e| format!("cannot read value file {}: {e}", p.display()))?
        }
        (Some("-"), None) => {
            let mut b = Vec::new();
            std::io::stdin()
                .lock()
                .take(MAX_VALUE as u64 + 1)
                .read_to_end(&mut b)
                .map_err(|e| format!("cannot read the value from stdin: {e}"))?;
            b
        }
        (Some(a), None) => a.as_bytes().to_vec(),
        (None, None) => return Err("no value given".into()),
    };
    if v.len() > MAX_VALUE {
        return Err(format!(
            "the value is larger than the limit of {MAX_VALUE} bytes (1 MiB)"
        ));
    }
    Ok(v)
}

/// Sets `field` to the value as a UTF-8 string if it is one, else base64 (standard
/// alphabet, padded), and `<field>_encoding` to `"utf8"` or `"base64"`.
fn put_value(o: &mut Value, field: &str, v: &[u8]) {
    let (text, enc) = match std::str::from_utf8(v) {
        Ok(s) => (s.to_string(), "utf8"),
        Err(_) => (base64(v), "base64"),
    };
    o[field] = Value::String(text);
    o[format!("{field}_encoding")] = Value::String(enc.into());
}

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn not_found(json: bool, key: &str) -> u8 {
    if json {
        say(true, json!({"key": key, "found": false}), String::new);
    }
    eprintln!("ballot-cli: key not found");
    REFUSED
}

/// Reports a command that failed for want of the cluster (or was rejected by it).
fn failed(c: &Client, e: ClientError) -> u8 {
    match e {
        ClientError::Rejected(s) => {
            eprintln!("ballot-cli: rejected by the cluster: {s}");
            REFUSED
        }
        ClientError::SessionExpired(s) => {
            eprintln!("ballot-cli: outcome unknown: {s}");
            UNAVAILABLE
        }
        ClientError::Unreachable(all) => {
            eprintln!(
                "ballot-cli: unavailable: no endpoint accepts connections ({} tried)",
                all.len()
            );
            for (a, e) in all {
                eprintln!("  {a}: {e}");
            }
            UNAVAILABLE
        }
        ClientError::Unavailable(last) => {
            let all = c.cluster_status();
            let up = all.iter().filter(|(_, r)| r.is_ok()).count();
            let leader = all.iter().find_map(|(a, r)| match r {
                Ok(s) if s.role == "leader" => Some((a, s.node)),
                _ => None,
            });
            match leader {
                None => eprintln!(
                    "ballot-cli: no leader: {up} of {} replicas reachable",
                    all.len()
                ),
                Some((a, n)) => eprintln!(
                    "ballot-cli: unavailable: no answer in time ({last}); node {n} at {a} \
                     leads, {up} of {} replicas reachable",
                    all.len()
                ),
            }
            for (a, r) in &all {
                match r {
                    Ok(s) => eprintln!("  {a}: node {} {}", s.node, s.role),
                    Err(e) => eprintln!("  {a}: {e}"),
                }
            }
            UNAVAILABLE
        }
    }
}

fn status_json(a: &str, s: &NodeStatus) -> Value {
    json!({
        "endpoint": a,
        "node": s.node,
        "role": s.role,
        "ballot_round": s.ballot_round,
        "ballot_node": s.ballot & 0xFF,
        "commit": s.commit,
        "applied": s.applied,
        "leader": s.leader,
        "log_base": s.log_base,
        "checkpoint": s.checkpoint,
        "digest": format!("{:016x}", s.digest),
        "digest_index": s.digest_index,
    })
}

fn status(c: &Client, json: bool) -> u8 {
    each_endpoint(json, &c.cluster_status(), |a, s| {
        say(json, status_json(a, s), || {
            format!(
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
            )
        })
    })
}

/// Prints the answers to a request sent to every endpoint (`answered` prints one that
/// answered, this an endpoint that did not) and returns the exit code: 0 if any answered,
/// else 3.
fn each_endpoint<T>(
    json: bool,
    all: &[(String, Result<T, NodeError>)],
    answered: impl Fn(&str, &T),
) -> u8 {
    for (a, r) in all {
        match r {
            Ok(v) => answered(a, v),
            Err(e) => say(json, json!({"endpoint": a, "error": e.to_string()}), || {
                format!("{a} unreachable: {e}")
            }),
        }
    }
    if all.iter().any(|(_, r)| r.is_ok()) {
        OK
    } else {
        eprintln!("ballot-cli: no node answered");
        UNAVAILABLE
    }
}

/// What is wrong with one node, if anything.
fn node_problem(r: &Result<NodeStatus, NodeError>) -> Option<String> {
    match r {
        Err(e) => Some(format!("unreachable: {e}")),
        Ok(s) if s.role == "recovering" || s.role == "stopped" => Some(s.role.clone()),
        Ok(s) if s.leader.is_none() => Some("knows no leader".into()),
        Ok(_) => None,
    }
}

fn health(c: &Client, json: bool) -> u8 {
    let all = c.cluster_status();
    let mut problems = Vec::new();
    let mut nodes = Vec::new();
    for (a, r) in &all {
        let p = node_problem(r);
        let mut o = match r {
            Ok(s) => json!({"endpoint": a, "node": s.node, "role": s.role, "leader": s.leader}),
            Err(_) => json!({"endpoint": a}),
        };
        o["healthy"] = Value::Bool(p.is_none());
        if let Some(p) = &p {
            o["problem"] = Value::String(p.clone());
            problems.push(match r {
                Ok(s) => format!("{a} (node {}): {p}", s.node),
                Err(_) => format!("{a}: {p}"),
            });
        }
        nodes.push(o);
    }
    let ok = || all.iter().filter_map(|(_, r)| r.as_ref().ok());
    let leader = ok().find(|s| s.role == "leader").map(|s| s.node);
    if leader.is_none() {
        problems.push("no node is leader".into());
    }
    let mut named: Vec<u8> = ok().filter_map(|s| s.leader).collect();
    named.sort_unstable();
    named.dedup();
    if named.len() > 1 {
        problems.push(format!("nodes disagree on the leader: {named:?}"));
    }
    let healthy = problems.is_empty();
    if json {
        say(
            true,
            json!({"healthy": healthy, "leader": leader, "nodes": nodes, "problems": problems}),
            String::new,
        );
    } else {
        for (a, r) in &all {
            match (r, node_problem(r)) {
                (Ok(s), None) => println!("{a} node={} role={} healthy", s.node, s.role),
                (_, p) => println!("{a} unhealthy: {}", p.unwrap_or_default()),
            }
        }
    }
    if healthy {
        if !json {
            println!(
                "cluster healthy: leader node {}, all {} nodes answer",
                leader.unwrap_or_default(),
                all.len()
            );
        }
        OK
    } else {
        eprintln!("ballot-cli: unhealthy: {}", problems.join("; "));
        UNAVAILABLE
    }
}
