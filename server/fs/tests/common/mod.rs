//! Running the real tools the ext4 tests are judged by (e2fsprogs).

use std::process::Command;

/// Runs a tool that must succeed; its output (stdout and stderr).
pub fn run(cmd: &str, args: &[&str]) -> String {
    let (code, text) = run_status(cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?}:\n{text}");
    text
}

/// Runs a tool: its exit code and output.
pub fn run_status(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} (install e2fsprogs): {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}
