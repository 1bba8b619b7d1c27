//! `ballot-bench --fabric rdma` without an RDMA device: a clear error, exit 1, no panic.

use std::process::Command;

#[test]
fn rdma_without_a_device_is_a_clear_error() {
    if matches!(ballot_verbs::verbs::device_names(), Ok(d) if !d.is_empty()) {
        eprintln!("an RDMA device is present; skipping the no-device check");
        return;
    }
    for sub in [&[][..], &["raw"][..], &["compare"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_ballot-bench"))
            .args(sub)
            .args(["--fabric", "rdma", "--duration", "1", "--warmup", "0"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{sub:?}: {err}");
        assert!(err.contains("no RDMA device"), "{sub:?}: {err}");
        assert!(!err.contains("panicked"), "{sub:?}: {err}");
    }
}
