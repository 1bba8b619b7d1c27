//! `ballot-node --fabric rdma` on a machine without an RDMA device: a clear error and a
//! non-zero exit, never a panic. (On a machine with a device this checks nothing: the RDMA
//! cluster itself is tested in the Soft-RoCE guest, `scripts/rxe-vm.sh`.)

use std::process::Command;

#[test]
fn rdma_without_a_device_is_a_clear_error() {
    if matches!(ballot_verbs::verbs::device_names(), Ok(d) if !d.is_empty()) {
        eprintln!("an RDMA device is present; skipping the no-device check");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ballot-node-rdma-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("key"), "k\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ballot-node"))
        .args([
            "--node",
            "0",
            "--cluster",
            "0x51",
            "--peers",
            "0=127.0.0.1:1,1=127.0.0.1:2,2=127.0.0.1:3",
            "--client-addr",
            "127.0.0.1:0",
            "--fabric",
            "rdma",
            "--initial-cluster-state",
            "new",
        ])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--key-file")
        .arg(dir.join("key"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // The fabric is built before anything is written: a failed start leaves no data dir.
    let left = dir.join("data").exists();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        !left,
        "a start that failed on its fabric created the data dir"
    );
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains("no RDMA device"), "stderr: {err}");
    assert!(err.contains("rxe"), "the hint names Soft-RoCE: {err}");
    assert!(!err.contains("panicked"), "stderr: {err}");
}
