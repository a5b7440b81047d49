//! The host network banger owns, for real, inside a network namespace this test makes: the
//! bridge, taps on it, `table inet banger` next to a table banger must never touch, and the
//! subnet check against the namespace's routes.

mod common;

use std::net::Ipv4Addr;
use std::process::Command;

use banger::net::{Bridge, HostNet, Subnet, BRIDGE};

const INSIDE: &str = "BANGER_TEST_INSIDE_NETNS";

/// Runs this test binary's `test` again inside `unshare --net`; true when already inside.
fn inside_netns(test: &str) -> bool {
    if std::env::var_os(INSIDE).is_some() {
        return true;
    }
    if !common::available(&["unshare", "nft", "ip"]) {
        return false;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .arg("--net")
        .arg(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .output()
        .unwrap();
    let text = common::text(&out);
    assert!(out.status.success(), "inside the namespace:\n{text}");
    assert!(text.contains("1 passed"), "{text}");
    false
}

fn sh(script: &str) -> String {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(out.status.success(), "{script}: {}", common::text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn links() -> serde_json::Value {
    serde_json::from_str(&sh("ip -j -d link show")).unwrap()
}

fn link<'a>(all: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    all.as_array().unwrap().iter().find(|l| l["ifname"] == name)
}

#[tokio::test]
async fn bridge_taps_and_the_nft_table_come_and_go_without_touching_anything_else() {
    if !inside_netns("bridge_taps_and_the_nft_table_come_and_go_without_touching_anything_else") {
        return;
    }
    sh("ip link set lo up; printf 'table inet other {\\n chain c { type filter hook forward priority 0; }\\n}\\n' | nft -f -");
    let subnet = Subnet::new(Ipv4Addr::new(172, 30, 99, 0), 24);
    let net = Bridge::new(Ok(subnet), vec![]);
    net.attach("bgrtest000001", &[]).await.unwrap();
    net.attach("bgrtest000002", &[]).await.unwrap();
    // Attaching again (a tap left by a crashed VMM) starts from a fresh tap.
    net.attach("bgrtest000002", &[]).await.unwrap();

    let all = links();
    let bridge = link(&all, BRIDGE).expect("bridge");
    assert_eq!(bridge["linkinfo"]["info_kind"], "bridge");
    for tap in ["bgrtest000001", "bgrtest000002"] {
        let t = link(&all, tap).expect(tap);
        assert_eq!(t["master"], BRIDGE, "{t}");
        assert_eq!(t["linkinfo"]["info_kind"], "tun", "{t}");
    }
    let addrs = sh("ip -4 -o addr show dev banger0");
    assert!(addrs.contains("172.30.99.1/24"), "{addrs}");
    let walls = sh("nft list table bridge banger");
    assert!(
        walls.contains("iifname \"bgr*\" oifname \"bgr*\" drop"),
        "{walls}"
    );
    let rules = sh("nft list table inet banger");
    assert!(
        rules.contains("masquerade") && rules.contains("172.30.99.0/24"),
        "{rules}"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap()
            .trim(),
        "1"
    );

    // The subnet now routes through banger0: that is ours, not a collision.
    assert_eq!(
        banger::net::choose_subnet(subnet, false).await.unwrap(),
        subnet
    );

    net.detach("bgrtest000001", &[]).await.unwrap();
    net.detach("bgrtest000001", &[]).await.unwrap();
    assert!(link(&links(), "bgrtest000001").is_none());
    net.teardown().await.unwrap();
    net.teardown().await.unwrap();
    let all = links();
    assert!(link(&all, BRIDGE).is_none());
    // A bridge's removal takes its ports' taps off it; banger's own detach removes them.
    net.detach("bgrtest000002", &[]).await.unwrap();
    let tables = sh("nft list tables");
    assert!(!tables.contains("inet banger"), "{tables}");
    assert!(!tables.contains("bridge banger"), "{tables}");
    assert!(
        tables.contains("inet other"),
        "another table was touched: {tables}"
    );
}

#[tokio::test]
async fn a_subnet_over_an_existing_route_is_refused_and_the_default_moves_aside() {
    if !inside_netns("a_subnet_over_an_existing_route_is_refused_and_the_default_moves_aside") {
        return;
    }
    sh("ip link add d0 type bridge && ip addr add 172.30.96.9/22 dev d0 && ip link set d0 up");
    let wanted = Subnet::new(Ipv4Addr::new(172, 30, 99, 0), 24);
    let e = banger::net::choose_subnet(wanted, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("172.30.99.0/24") && e.contains("172.30.96.0/22") && e.contains("d0"),
        "{e}"
    );
    assert!(e.contains("config.toml"), "says what to do: {e}");
    assert_eq!(
        banger::net::choose_subnet(wanted, true).await.unwrap(),
        Subnet::new(Ipv4Addr::new(172, 30, 100, 0), 24)
    );
    // A bridge built on a refused subnet refuses every VM with the same clear error.
    let refused = Bridge::new(banger::net::choose_subnet(wanted, false).await, vec![]);
    let e = refused
        .attach("bgrtest000003", &[])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("172.30.96.0/22"), "{e}");
    assert!(link(&links(), BRIDGE).is_none());
}
