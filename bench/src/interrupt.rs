//! Ctrl-C: the first SIGINT asks the run to stop (the point being measured ends early and
//! is reported as partial, the sweep stops, and what was measured is printed); a second one
//! exits at once, killing any `ballot-node` children first.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(sig: libc::c_int) {
    if REQUESTED.swap(true, Ordering::SeqCst) {
        crate::procs::kill_all_children();
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) }
    }
}

/// Installs the SIGINT handler (once, at start-up).
pub fn install() {
    // SAFETY: the handler only touches an atomic, kill(2) and _exit, all async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}

/// Whether Ctrl-C was pressed: every measuring loop checks this and stops.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}
