//! The router advertisement responder inside a network namespace this test creates (a veth
//! pair va/vb): `ra_tool respond va` answers, `ra_tool solicit vb` sends a router solicitation
//! like iPXE's and must receive an advertisement with M = O = 0 and router lifetime 0 from va's
//! link-local address. Needs root and iproute2; otherwise it prints why and returns, or fails
//! under `CAIRN_SLOW_TESTS=1`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use cairn_bootproto::testing::missing_prerequisite;

fn ra_tool() -> Option<PathBuf> {
    let deps = std::env::current_exe().ok()?.parent()?.to_path_buf();
    let tool = deps.parent()?.join("examples").join("ra_tool");
    tool.exists().then_some(tool)
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn answers_router_solicitations_in_a_namespace() {
    let Some(tool) = ra_tool() else {
        missing_prerequisite("examples/ra_tool not built (cargo test builds it)");
        return;
    };
    let ns = format!("cairnra{}", std::process::id());
    if !ip(&["netns", "add", &ns]) {
        missing_prerequisite("cannot create a network namespace (needs root and iproute2)");
        return;
    }
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _cleanup = Cleanup(ns.clone());
    let exec = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    assert!(exec(&[
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0"
    ]));
    assert!(ip(&[
        "-n", &ns, "link", "add", "va", "type", "veth", "peer", "name", "vb"
    ]));
    for link in ["lo", "va", "vb"] {
        assert!(ip(&["-n", &ns, "link", "set", link, "up"]));
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut responder = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(&tool)
        .args(["respond", "va"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let output = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(&tool)
        .args(["solicit", "vb"])
        .output()
        .unwrap();
    let _ = responder.kill();
    let _ = responder.wait();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "no advertisement: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.starts_with("RA flags=00 lifetime=0 len=24 from=[fe80::"),
        "{stdout}"
    );
}
