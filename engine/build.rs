//! Embeds the git commit this crate was built from as `BALLOT_GIT_COMMIT` (for
//! `ballot::version`, and so `--version` on every binary): `git rev-parse --short HEAD`, or
//! "unknown" outside a git checkout (a source tarball, `cargo install` from a copy).

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BALLOT_GIT_COMMIT={commit}");
    // Build again when HEAD moves: HEAD itself (a checkout) and the refs it may point at (a
    // commit). In a worktree the two live in different directories.
    for (flag, files) in [
        ("--git-dir", &["HEAD"][..]),
        ("--git-common-dir", &["packed-refs", "refs/heads"][..]),
    ] {
        if let Some(dir) = git(&["rev-parse", flag]) {
            for f in files {
                let p = PathBuf::from(&dir).join(f);
                if p.exists() {
                    println!("cargo:rerun-if-changed={}", p.display());
                }
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
