//! iPXE scripts, rendered purely from a client's [`BootPlan`], and the query parsing of the
//! script and login URLs. The node serves them over HTTP (bootproto has no HTTP server).
//!
//! URLs the scripts use (the node routes them):
//! - the script: `<script_url>?mac=<mac>` (from DHCP, see [`crate::dhcp::core::script_url`]);
//! - the login step: `<login_url>?mac=${net0/mac}&user=${username:uristring}&password=${password:uristring}`;
//!   [`parse_boot_query`] reads both.
//!
//! Every text that comes from the cluster (names, labels, IQNs) is filtered to a safe character
//! set before it is written into a script, so it cannot inject iPXE commands or `${...}`
//! expansions.

use std::net::SocketAddr;

use crate::mac::MacAddr;

/// One bootable image for this client: a LUN on two portals (primary first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    pub label: String,
    pub target_iqn: String,
    pub primary: SocketAddr,
    /// Second path for multipath `sanboot` (iPXE and the iBFT take at most two).
    pub standby: Option<SocketAddr>,
    pub lun: u16,
}

/// Why there is nothing to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMessage {
    NoImageAssigned,
    ClusterUnavailable,
    LoginFailed,
    /// Unknown machine, answered because of the registration policy.
    NotRegistered,
}

/// What the client is told to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanContent {
    /// Boot one of `entries`; a menu when there are several.
    Boot {
        entries: Vec<BootEntry>,
        default_entry: usize,
        menu_timeout_ms: u64,
    },
    /// Images are assigned to users: ask for a login, send it to `login_url`.
    Login { login_url: String },
    /// Show a message and retry after `retry_secs`.
    Message {
        message: BootMessage,
        retry_secs: u32,
    },
}

/// Everything a client's script depends on (pure data, built by the node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootPlan {
    pub client_mac: MacAddr,
    pub client_name: Option<String>,
    pub initiator_iqn: String,
    /// Where the script is fetched again on retry (the script URL with this client's MAC).
    pub retry_url: String,
    pub content: PlanContent,
}

/// Renders the iPXE script for `plan`.
pub fn render_ipxe_script(plan: &BootPlan) -> String {
    let mut s = String::from("#!ipxe\n");
    let who = match &plan.client_name {
        Some(name) => format!("{} ({})", text(name), plan.client_mac),
        None => plan.client_mac.to_string(),
    };
    let retry_url = url(&plan.retry_url);
    match &plan.content {
        PlanContent::Boot {
            entries,
            default_entry,
            menu_timeout_ms,
        } if !entries.is_empty() => {
            s += &format!("set initiator-iqn {}\n", iqn(&plan.initiator_iqn));
            if entries.len() > 1 {
                let default = (*default_entry).min(entries.len() - 1);
                s += ":menu\n";
                s += &format!("menu Cairn: choose an image for {who}\n");
                for (i, entry) in entries.iter().enumerate() {
                    s += &menu_item(i, &entry.label);
                }
                s += &format!("choose --default image{default} --timeout {menu_timeout_ms} target || goto menu\n");
                s += "goto ${target}\n";
            }
            for (i, entry) in entries.iter().enumerate() {
                if entries.len() > 1 {
                    s += &format!(":image{i}\n");
                }
                s += &format!("echo Cairn: booting {} for {who}\n", text(&entry.label));
                s += &format!("sanboot {} || goto failed\n", sanboot_uris(entry));
            }
            s += ":failed\n";
            s += "echo Cairn: the boot failed (${errno}); retrying in 10 s\n";
            s += &retry(&retry_url, 10);
        }
        PlanContent::Boot { .. } => {
            s += &message(&who, BootMessage::NoImageAssigned, &retry_url, 30);
        }
        PlanContent::Login { login_url } => {
            s += ":login\n";
            s += &format!("echo Cairn: images for {who} are assigned to users: please log in\n");
            // iPXE keeps settings across scripts: the name stays filled in after a failed try,
            // the password does not.
            s += "clear password\n";
            s += "login || goto cancelled\n";
            let login_url = url(login_url);
            let separator = if login_url.contains('?') { '&' } else { '?' };
            s += &format!(
                "chain --autofree --replace {login_url}{separator}mac=${{net0/mac:hexhyp}}&user=${{username:uristring}}&password=${{password:uristring}} || goto failed\n"
            );
            s += ":cancelled\n";
            s += "echo Cairn: login cancelled\n";
            s += "goto login\n";
            s += ":failed\n";
            s += "echo Cairn: the login could not be checked (${errno}); retrying in 10 s\n";
            s += &retry(&retry_url, 10);
        }
        PlanContent::Message {
            message: kind,
            retry_secs,
        } => {
            s += &message(&who, *kind, &retry_url, *retry_secs);
        }
    }
    s
}

fn message(who: &str, kind: BootMessage, retry_url: &str, retry_secs: u32) -> String {
    let text = match kind {
        BootMessage::NoImageAssigned => {
            format!("no image is assigned to {who}. Ask an administrator to assign one.")
        }
        BootMessage::ClusterUnavailable => {
            "the storage cluster is unavailable right now.".to_owned()
        }
        BootMessage::LoginFailed => format!(
            "login failed for {who}: unknown user, wrong password, or no image for this user."
        ),
        BootMessage::NotRegistered => format!(
            "this machine ({who}) is not registered. An administrator can adopt it in the console."
        ),
    };
    let mut s = format!("echo Cairn: {text}\n");
    s += &format!("echo Retrying in {retry_secs} s (press a key to retry now)\n");
    s += &retry(retry_url, retry_secs);
    s
}

fn retry(retry_url: &str, secs: u32) -> String {
    let mut s = format!(
        "prompt --timeout {} Press any key to retry now ||\n",
        u64::from(secs.max(1)) * 1000
    );
    s += &format!("chain --autofree --replace {retry_url} || goto failed_retry\n");
    s += ":failed_retry\n";
    s += "prompt --timeout 10000 Retrying ||\n";
    s += &format!("chain --autofree --replace {retry_url} || goto failed_retry\n");
    s
}

/// `iscsi:<ip>::<port>:<lun>:<iqn>` for each path, primary first.
pub fn sanboot_uris(entry: &BootEntry) -> String {
    let uri = |portal: &SocketAddr| {
        let host = match portal {
            SocketAddr::V4(v4) => v4.ip().to_string(),
            SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
        };
        format!(
            "iscsi:{host}::{}:{}:{}",
            portal.port(),
            entry.lun,
            iqn(&entry.target_iqn)
        )
    };
    match &entry.standby {
        Some(standby) => format!("{} {}", uri(&entry.primary), uri(standby)),
        None => uri(&entry.primary),
    }
}

/// Free text (labels, names): printable ASCII without `$`, `#`, `\`, `"`, `'`, `|`, `&`, `;`.
fn text(raw: &str) -> String {
    let filtered: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && !"$#\\\"'|&;`{}".contains(c) || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    if filtered.trim().is_empty() {
        "(unnamed)".to_owned()
    } else {
        filtered
    }
}

/// IQNs: RFC 3720 characters only (lowercase letters, digits, `.`, `-`, `:`).
fn iqn(raw: &str) -> String {
    raw.chars()
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-:".contains(*c))
        .take(223)
        .collect()
}

/// URLs written by the node: no whitespace, no `$`-expansions.
fn url(raw: &str) -> String {
    raw.chars()
        .filter(|c| c.is_ascii_graphic() && !"${}\\\"'`".contains(*c))
        .collect()
}

/// Line `i` (from 0) of a `menu`: item `image<i>`, labelled `<n>. <label>`; the first nine
/// get the digit `n` as their key, so a keypress picks them without the arrow keys.
pub fn menu_item(i: usize, label: &str) -> String {
    let n = i + 1;
    let key = if n <= 9 {
        format!("--key {n} ")
    } else {
        String::new()
    };
    format!("item {key}image{i} {n}. {}\n", text(label))
}

/// What a script or login request carries in its query string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootQuery {
    pub mac: Option<MacAddr>,
    pub user: Option<String>,
    pub password: Option<String>,
}

/// Why a query string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("bad percent-encoding in {0:?}")]
    Encoding(String),
    #[error("invalid mac {0:?}")]
    Mac(String),
    #[error("query of {0} bytes is too long")]
    TooLong(usize),
}

/// Parses `mac=..&user=..&password=..` (the part after `?`). Unknown keys are ignored.
///
/// `password` must come last and takes the rest of the query, `&` included: iPXE (at least
/// Debian's 1.0.0+git-20190125) decodes the `%26` that `${password:uristring}` wrote and sends
/// the query with a bare `&`, and never writes `+` for a space, so `+` stays a `+` here.
pub fn parse_boot_query(query: &str) -> Result<BootQuery, QueryError> {
    if query.len() > 2048 {
        return Err(QueryError::TooLong(query.len()));
    }
    let mut out = BootQuery::default();
    let start = query
        .match_indices("password=")
        .map(|(at, _)| at)
        .find(|&at| at == 0 || query[..at].ends_with('&'));
    let (fields, password) = match start {
        Some(at) => (&query[..at], Some(&query[at + "password=".len()..])),
        None => (query, None),
    };
    if let Some(raw) = password {
        out.password = Some(
            percent_decode(raw)
                .ok_or_else(|| QueryError::Encoding(raw.chars().take(64).collect()))?,
        );
    }
    for pair in fields.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value)
            .ok_or_else(|| QueryError::Encoding(value.chars().take(64).collect()))?;
        match key {
            "mac" => {
                out.mac = Some(
                    value
                        .parse()
                        .map_err(|_| QueryError::Mac(value.chars().take(64).collect()))?,
                )
            }
            "user" => out.user = Some(value),
            _ => {}
        }
    }
    Ok(out)
}

fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(label: &str, primary: &str, standby: Option<&str>) -> BootEntry {
        BootEntry {
            label: label.into(),
            target_iqn: "iqn.2025-01.io.cairn:vol-1".into(),
            primary: primary.parse().unwrap(),
            standby: standby.map(|s| s.parse().unwrap()),
            lun: 0,
        }
    }

    fn plan(content: PlanContent) -> BootPlan {
        BootPlan {
            client_mac: "52:54:00:77:00:10".parse().unwrap(),
            client_name: Some("desk-1".into()),
            initiator_iqn: "iqn.2025-01.io.cairn:desk-1".into(),
            retry_url: "http://10.0.0.1:8080/boot/ipxe?mac=52-54-00-77-00-10".into(),
            content,
        }
    }

    fn check(plan: &BootPlan, expect: &str) {
        let got = render_ipxe_script(plan);
        let expect: String = expect
            .lines()
            .map(|l| l.trim_start())
            .filter(|l| !l.is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(got, expect, "\n--- got ---\n{got}");
    }

    const RETRY: &str = "prompt --timeout 10000 Press any key to retry now ||
        chain --autofree --replace http://10.0.0.1:8080/boot/ipxe?mac=52-54-00-77-00-10 || goto failed_retry
        :failed_retry
        prompt --timeout 10000 Retrying ||
        chain --autofree --replace http://10.0.0.1:8080/boot/ipxe?mac=52-54-00-77-00-10 || goto failed_retry";

    #[test]
    fn single_image_sanboots_two_paths() {
        let p = plan(PlanContent::Boot {
            entries: vec![entry("Debian 12", "10.0.0.1:3260", Some("10.0.0.2:3260"))],
            default_entry: 0,
            menu_timeout_ms: 5000,
        });
        check(&p, &format!("#!ipxe
            set initiator-iqn iqn.2025-01.io.cairn:desk-1
            echo Cairn: booting Debian 12 for desk-1 (52:54:00:77:00:10)
            sanboot iscsi:10.0.0.1::3260:0:iqn.2025-01.io.cairn:vol-1 iscsi:10.0.0.2::3260:0:iqn.2025-01.io.cairn:vol-1 || goto failed
            :failed
            echo Cairn: the boot failed (${{errno}}); retrying in 10 s
            {RETRY}"));
    }

    #[test]
    fn several_images_give_a_menu_with_timeout() {
        let p = plan(PlanContent::Boot {
            entries: vec![
                entry("Debian", "10.0.0.1:3260", Some("10.0.0.2:3260")),
                entry("Win ${x}", "[fd00::1]:3261", None),
            ],
            default_entry: 1,
            menu_timeout_ms: 8000,
        });
        check(&p, &format!("#!ipxe
            set initiator-iqn iqn.2025-01.io.cairn:desk-1
            :menu
            menu Cairn: choose an image for desk-1 (52:54:00:77:00:10)
            item --key 1 image0 1. Debian
            item --key 2 image1 2. Win __x_
            choose --default image1 --timeout 8000 target || goto menu
            goto ${{target}}
            :image0
            echo Cairn: booting Debian for desk-1 (52:54:00:77:00:10)
            sanboot iscsi:10.0.0.1::3260:0:iqn.2025-01.io.cairn:vol-1 iscsi:10.0.0.2::3260:0:iqn.2025-01.io.cairn:vol-1 || goto failed
            :image1
            echo Cairn: booting Win __x_ for desk-1 (52:54:00:77:00:10)
            sanboot iscsi:[fd00::1]::3261:0:iqn.2025-01.io.cairn:vol-1 || goto failed
            :failed
            echo Cairn: the boot failed (${{errno}}); retrying in 10 s
            {RETRY}"));
    }

    #[test]
    fn login_and_messages() {
        let p = plan(PlanContent::Login {
            login_url: "http://10.0.0.1:8080/boot/login".into(),
        });
        check(&p, &format!("#!ipxe
            :login
            echo Cairn: images for desk-1 (52:54:00:77:00:10) are assigned to users: please log in
            clear password
            login || goto cancelled
            chain --autofree --replace http://10.0.0.1:8080/boot/login?mac=${{net0/mac:hexhyp}}&user=${{username:uristring}}&password=${{password:uristring}} || goto failed
            :cancelled
            echo Cairn: login cancelled
            goto login
            :failed
            echo Cairn: the login could not be checked (${{errno}}); retrying in 10 s
            {RETRY}"));
        let p = plan(PlanContent::Message {
            message: BootMessage::ClusterUnavailable,
            retry_secs: 10,
        });
        check(
            &p,
            &format!(
                "#!ipxe
            echo Cairn: the storage cluster is unavailable right now.
            echo Retrying in 10 s (press a key to retry now)
            {RETRY}"
            ),
        );
        let empty = render_ipxe_script(&plan(PlanContent::Boot {
            entries: vec![],
            default_entry: 0,
            menu_timeout_ms: 0,
        }));
        assert!(empty.contains("no image is assigned to desk-1"), "{empty}");
    }

    #[test]
    fn queries_parse() {
        let q =
            parse_boot_query("mac=52-54-00-77-00-10&x=1&user=ann%20b&password=p%26w%3D").unwrap();
        assert_eq!(q.mac, Some("52:54:00:77:00:10".parse().unwrap()));
        assert_eq!(q.user.as_deref(), Some("ann b"));
        assert_eq!(q.password.as_deref(), Some("p&w="));
        // What Debian's iPXE sends for `s3cret & pass+1`: the `&` bare, the `+` kept.
        let q = parse_boot_query("mac=52-54-00-77-00-10&user=ann&password=s3cret%20&%20pass+1")
            .unwrap();
        assert_eq!(q.password.as_deref(), Some("s3cret & pass+1"));
        assert_eq!(q.user.as_deref(), Some("ann"));
        let q = parse_boot_query("user=mypassword=x&password=y").unwrap();
        assert_eq!(q.user.as_deref(), Some("mypassword=x"));
        assert_eq!(q.password.as_deref(), Some("y"));
        assert!(matches!(
            parse_boot_query("mac=zz"),
            Err(QueryError::Mac(_))
        ));
        assert!(matches!(
            parse_boot_query("user=%4"),
            Err(QueryError::Encoding(_))
        ));
    }

    proptest! {
        #[test]
        fn query_parser_never_panics(q in ".{0,300}") {
            let _ = parse_boot_query(&q);
        }

        /// Any password survives the way iPXE sends it: `%`, whitespace and `#:@?` escaped,
        /// everything else (`&`, `=`, `+`) bare.
        #[test]
        fn passwords_survive_ipxe_query_encoding(password in ".{1,60}") {
            let mut sent = String::new();
            for c in password.chars() {
                if c == '%' || c.is_whitespace() || c.is_control() || "#:@?".contains(c) || !c.is_ascii() {
                    let mut utf8 = [0u8; 4];
                    for b in c.encode_utf8(&mut utf8).bytes() {
                        sent += &format!("%{b:02X}");
                    }
                } else {
                    sent.push(c);
                }
            }
            let q = parse_boot_query(&format!("mac=52-54-00-77-00-10&user=ann&password={sent}")).unwrap();
            prop_assert_eq!(q.password.as_deref(), Some(password.as_str()));
            prop_assert_eq!(q.user.as_deref(), Some("ann"));
        }

        #[test]
        fn cluster_text_cannot_inject(label in ".{0,100}", name in ".{0,100}", target in ".{0,100}") {
            let mut p = plan(PlanContent::Boot { entries: vec![entry(&label, "10.0.0.1:3260", None), entry("b", "10.0.0.2:3260", None)], default_entry: 0, menu_timeout_ms: 1 });
            p.client_name = Some(name);
            if let PlanContent::Boot { entries, .. } = &mut p.content { entries[0].target_iqn = target; }
            let script = render_ipxe_script(&p);
            prop_assert_eq!(script.matches('$').count(), 2, "only the script's own ${{target}} and ${{errno}}");
            let benign = render_ipxe_script(&plan(PlanContent::Boot { entries: vec![entry("a", "10.0.0.1:3260", None), entry("b", "10.0.0.2:3260", None)], default_entry: 0, menu_timeout_ms: 1 }));
            prop_assert_eq!(script.lines().count(), benign.lines().count());
        }
    }
}
