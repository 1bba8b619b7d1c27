//! One replica of a Ballot key-value cluster. See `docs/operations.md`.

use ballot_node::config::{Flags, LogFormat, NodeConfig};
use ballot_node::server::Node;
use clap::Parser;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() {
    let flags = Flags::parse();
    let cfg = match NodeConfig::load(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ballot-node: configuration error: {e}");
            std::process::exit(2);
        }
    };
    cfg.log.init();
    let format = cfg.log.format;
    let node = match Node::start(cfg) {
        Ok(n) => n,
        Err(e) => {
            match format {
                LogFormat::Text => eprintln!("ballot-node: {e}"),
                LogFormat::Json => tracing::error!(error = %e, "cannot start"),
            }
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
    match format {
        LogFormat::Text => eprintln!("ballot-node: shutting down"),
        LogFormat::Json => tracing::info!("shutting down"),
    }
    node.shutdown();
}
