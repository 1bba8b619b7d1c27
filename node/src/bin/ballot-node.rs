//! One replica of a Ballot key-value cluster. See `docs/operations.md`.

use ballot_node::config::{Flags, NodeConfig};
use ballot_node::server::Node;
use clap::Parser;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let flags = Flags::parse();
    let cfg = match NodeConfig::load(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ballot-node: configuration error: {e}");
            std::process::exit(2);
        }
    };
    let node = match Node::start(cfg) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("ballot-node: {e}");
            std::process::exit(1);
        }
    };
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("ballot-node: shutting down");
    node.shutdown();
}
