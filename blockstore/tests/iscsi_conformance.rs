//! Proves Cairn's iSCSI target against libiscsi's conformance suite: starts `cairn-iscsi-file`
//! on two loopback portals serving one scratch image, runs `iscsi-test-cu --dataloss -V --test
//! ALL url1 url2` (the second URL is the MultipathIO path to the same LUN), parses every test's
//! verdict and fails on any failed test. Prints the counts and every skip. Run twice: serving a
//! plain file, and serving a volume (chunk store base plus writable layer).
//!
//! Takes about 35 seconds per run. Skipped with a printed reason when libiscsi's `iscsi-test-cu` is not
//! installed (Debian package libiscsi-bin); failed instead under `CAIRN_SLOW_TESTS=1`.

use std::process::Command;

mod common;

use common::{free_port, have, missing_prerequisite, IscsiFile};

/// One test's verdict from iscsi-test-cu's verbose output.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Passed,
    Failed,
    Skipped(String),
}

/// Parses CUnit's verbose log: `Suite: X` starts a suite, `  Test: Y ...` a test; the verdict is
/// `passed`/`FAILED` on that line or at the start of a later one; a passed test that printed
/// `[SKIPPED]` counts as skipped (with the first skip reason).
fn parse(log: &str) -> Vec<(String, Verdict)> {
    let mut out = Vec::new();
    let mut suite = String::new();
    let mut current: Option<(String, Option<bool>, Option<String>)> = None;
    let flush = |cur: &mut Option<(String, Option<bool>, Option<String>)>,
                 out: &mut Vec<(String, Verdict)>| {
        if let Some((name, verdict, skip)) = cur.take() {
            let v = match (verdict, skip) {
                (Some(false), _) => Verdict::Failed,
                (_, Some(reason)) => Verdict::Skipped(reason),
                (Some(true), None) => Verdict::Passed,
                // No verdict seen (the run was cut short): count as failed.
                (None, None) => Verdict::Failed,
            };
            out.push((name, v));
        }
    };
    for line in log.lines() {
        if let Some(rest) = line.strip_prefix("Suite: ") {
            flush(&mut current, &mut out);
            suite = rest.trim().to_string();
            continue;
        }
        if let Some(rest) = line.strip_prefix("  Test: ") {
            flush(&mut current, &mut out);
            let name = rest.split_whitespace().next().unwrap_or("").to_string();
            let mut verdict = None;
            if line.contains("...passed") {
                verdict = Some(true);
            }
            if line.contains("...FAILED") {
                verdict = Some(false);
            }
            current = Some((format!("{suite}.{name}"), verdict, None));
        }
        if let Some(cur) = current.as_mut() {
            if let Some(at) = line.find("[SKIPPED]") {
                if cur.2.is_none() {
                    cur.2 = Some(line[at + 9..].trim().to_string());
                }
            }
            if cur.1.is_none() {
                if line.starts_with("passed") {
                    cur.1 = Some(true);
                } else if line.starts_with("FAILED") {
                    cur.1 = Some(false);
                }
            }
        }
    }
    flush(&mut current, &mut out);
    out
}

#[test]
fn parser_attributes_last_test_of_a_suite_correctly() {
    let log = "Suite: A\n  Test: One ...\n    [SKIPPED] no feature\npassed    Send PRIN\n\nSuite: B\n  Test: Two ...passed\n  Test: Three ...\nFAILED\n";
    let r = parse(log);
    assert_eq!(
        r,
        vec![
            (
                "A.One".to_string(),
                Verdict::Skipped("no feature".to_string())
            ),
            ("B.Two".to_string(), Verdict::Passed),
            ("B.Three".to_string(), Verdict::Failed),
        ]
    );
}

#[test]
fn libiscsi_conformance_all() {
    conformance(false);
}

/// The same suite against a volume (the image imported into a chunk store, plus a writable
/// layer) on a path that reports ALUA as a session's primary does: what clients actually get.
#[test]
fn libiscsi_conformance_all_through_a_volume() {
    conformance(true);
}

fn conformance(volume: bool) {
    if !have("iscsi-test-cu") {
        missing_prerequisite("iscsi-test-cu not found (apt-get install -y libiscsi-bin)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("conformance.img");
    let (p1, p2) = (free_port(), free_port());
    let iqn = cairn_blockstore::iscsi::target_name_for_client([0x52, 0x54, 0x00, 0x77, 0x00, 0x10]);
    let mut args: Vec<String> = vec![
        "--portal".into(),
        format!("127.0.0.1:{p1}"),
        "--portal".into(),
        format!("127.0.0.1:{p2}"),
        "--iqn".into(),
        iqn.clone(),
        "--file".into(),
        image.display().to_string(),
    ];
    if volume {
        // The base image: 256 MiB, all zeros but a few chunks (zero chunks are not stored).
        let file = std::fs::File::create(&image).expect("image");
        file.set_len(256 << 20).expect("image size");
        use std::os::unix::fs::FileExt;
        for at in [0u64, 1 << 20, 100 << 20] {
            file.write_all_at(&[0x5a; 65536], at).expect("image data");
        }
        // Served as a session's primary path is: implicit ALUA, active/optimized.
        args.extend([
            "--volume".into(),
            dir.path().join("volume").display().to_string(),
            "--alua".into(),
            "1".into(),
        ]);
    } else {
        args.extend(["--size-mib".into(), "256".into()]);
    }
    let _server = IscsiFile::start(&args);
    let url1 = format!("iscsi://127.0.0.1:{p1}/{iqn}/0");
    let url2 = format!("iscsi://127.0.0.1:{p2}/{iqn}/0");
    let output = Command::new("timeout")
        .args([
            "900",
            "iscsi-test-cu",
            "--dataloss",
            "-V",
            "--test",
            "ALL",
            &url1,
            &url2,
        ])
        .output()
        .expect("run iscsi-test-cu");
    let log = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    std::fs::write(dir.path().join("full.log"), &log).ok();
    let results = parse(&log);
    let passed = results
        .iter()
        .filter(|(_, v)| *v == Verdict::Passed)
        .count();
    let failed: Vec<&String> = results
        .iter()
        .filter(|(_, v)| *v == Verdict::Failed)
        .map(|(n, _)| n)
        .collect();
    let skipped: Vec<(&String, &String)> = results
        .iter()
        .filter_map(|(n, v)| {
            if let Verdict::Skipped(r) = v {
                Some((n, r))
            } else {
                None
            }
        })
        .collect();
    for (name, reason) in &skipped {
        println!("skipped {name}: {reason}");
    }
    for name in &failed {
        println!("failed {name}");
    }
    println!(
        "{}: {passed} passed, {} failed, {} skipped",
        if volume { "volume" } else { "file" },
        failed.len(),
        skipped.len()
    );
    assert!(
        results.len() >= 200,
        "iscsi-test-cu ran only {} tests; log tail: {}",
        results.len(),
        &log[log.len().saturating_sub(2000)..]
    );
    assert!(failed.is_empty(), "conformance failures: {failed:?}");
    // The MultipathIO suite must have run with the second path, not been skipped.
    for (name, v) in &results {
        if name.starts_with("MultipathIO.") {
            assert_eq!(*v, Verdict::Passed, "{name} did not pass");
        }
    }
}
