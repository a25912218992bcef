//! What the tests that drive `cairn-iscsi-file` share: starting it, free loopback ports, and
//! checking for a peer tool. Each test file uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

/// A running `cairn-iscsi-file`, killed on drop.
pub struct IscsiFile(Child);

impl IscsiFile {
    /// Starts it with `args` and waits for its `ready` line.
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> IscsiFile {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn-iscsi-file"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cairn-iscsi-file");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read ready line");
        assert_eq!(line.trim(), "ready", "cairn-iscsi-file did not start");
        IscsiFile(child)
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for IscsiFile {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
