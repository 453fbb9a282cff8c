//! Running child processes with clear errors.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{bail, Context, Result};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Cargo's target directory, honouring CARGO_TARGET_DIR.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// The cargo that launched us (so the same toolchain is used), else `cargo`.
pub fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// `Command::new(program)` without the variables `cargo run` set for xtask
/// itself. A nested cargo passes them on to build scripts, and some (ring's)
/// rerun when CARGO_MANIFEST_DIR differs: every `cargo xtask` would then
/// rebuild half the tree, and the next plain `cargo build` again.
fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs `cargo ARGS` in the workspace root, failing when it fails.
pub fn cargo(args: &[&str]) -> Result<()> {
    crate::disk::warn_if_short(&target_dir());
    status(&cargo_bin(), args).map_err(|err| match crate::disk::blame(&target_dir()) {
        Some(why) => err.context(why),
        None => err,
    })
}

/// A child process that exited non-zero.
#[derive(Debug)]
pub struct ChildFailed {
    pub shown: String,
    pub status: ExitStatus,
    /// Exit code to pass on (1 when the child was killed by a signal).
    pub code: u8,
    /// The child prints its own one-line error: xtask adds nothing.
    pub quiet: bool,
}

impl std::fmt::Display for ChildFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` failed ({})", self.shown, self.status)
    }
}

impl std::error::Error for ChildFailed {}

/// Runs a program with inherited stdio in the workspace root; a non-zero exit is an error.
pub fn status<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<()> {
    run_status(program, args, false)
}

/// [`status`] for a child whose own error message is the whole story (the
/// sandbox): its failure is passed on as its exit code, with no second line.
pub fn status_quiet<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<()> {
    run_status(program, args, true)
}

fn run_status<S: AsRef<OsStr>>(program: &str, args: &[S], quiet: bool) -> Result<()> {
    let shown = show(program, args);
    eprintln!("xtask: running {shown}");
    let st = command(program)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("could not start `{shown}` (is {program} installed?)"))?;
    if !st.success() {
        let code = st.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(1);
        return Err(ChildFailed {
            shown,
            status: st,
            code: code.max(1),
            quiet,
        }
        .into());
    }
    Ok(())
}

/// True when the program runs and exits 0 (output discarded).
pub fn succeeds<S: AsRef<OsStr>>(program: &str, args: &[S]) -> bool {
    command(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Captures stdout of a program that must succeed.
pub fn output<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String> {
    let shown = show(program, args);
    let out = command(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn show<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}
