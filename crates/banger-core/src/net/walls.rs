//! The guest network's walls, written whole as banger's two nftables tables in one `nft -f`
//! transaction (no other table is touched):
//!
//! - `table bridge banger` sees every frame on `banger0`'s ports: a guest sends only from its
//!   own MAC and IPv4 address (Ethernet, IPv4 and ARP checked; IPv6 and any other protocol
//!   dropped, so no router advertisement gets through), and no frame goes from one guest's tap
//!   to another's unless both are `shared` VMs of one owner. A tap banger does not know drops
//!   everything.
//! - `table inet banger` sees what guests route through the host: nothing to a host address
//!   (every address of every interface: the input hook), replies to the host's own
//!   connections only; forwarding out drops link-local, private, shared and reserved ranges
//!   unless the operator allows them (`allow_egress`), lets DNS reach the resolvers banger gave
//!   the guests, narrows a VM to its own `egress` list when it has one, and masquerades.
//!
//! The ruleset is a function of the VMs that start, run or stop (their rows), so a restarted
//! daemon writes the same walls.

use std::fmt::Write;
use std::net::Ipv4Addr;

use super::error::invalid;
use super::{Subnet, BRIDGE, NFT_TABLE};
use crate::model::NetworkMode;
use crate::Result;

/// Destination ranges guests never reach unless allowed: this network, loopback, RFC 1918,
/// shared address space, link-local (cloud metadata), benchmarking, multicast and reserved.
pub const BLOCKED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// One entry of an egress list: an IPv4 network and, optionally, one TCP/UDP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Egress {
    /// The network address.
    pub net: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// Only this destination port (TCP and UDP), when set.
    pub port: Option<u16>,
}

impl Egress {
    /// Parses `CIDR[:PORT]` (`1.2.3.4` alone is a /32); `what` names the option or key.
    pub fn parse(s: &str, what: &str, ports: bool) -> Result<Self> {
        let bad = || {
            invalid(format!(
                "{what}: {s:?} is not an IPv4 CIDR{} such as 203.0.113.0/24{}",
                if ports { "[:PORT]" } else { "" },
                if ports { " or 203.0.113.7:443" } else { "" }
            ))
        };
        let (cidr, port) = match s.rsplit_once(':') {
            Some((c, p)) if ports => (c, Some(p.parse::<u16>().map_err(|_| bad())?)),
            Some(_) => return Err(bad()),
            None => (s, None),
        };
        if port == Some(0) {
            return Err(bad());
        }
        let (addr, prefix) = match cidr.split_once('/') {
            Some((a, p)) => (a, p.parse::<u8>().map_err(|_| bad())?),
            None => (cidr, 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        Ok(Egress {
            net: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
            port,
        })
    }

    fn cidr(&self) -> String {
        format!("{}/{}", self.net, self.prefix)
    }
}

/// Checks a CreateVM `egress` list.
pub fn check_egress(list: &[String]) -> Result<()> {
    if list.len() > 64 {
        return Err(invalid("egress: at most 64 entries; use wider networks"));
    }
    for e in list {
        Egress::parse(e, "egress", true)?;
    }
    Ok(())
}

/// A guest on the bridge, as the walls see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPort {
    /// The VM's id (names its chain).
    pub id: String,
    /// Its tap.
    pub tap: String,
    /// Its MAC address.
    pub mac: String,
    /// Its IPv4 address.
    pub address: Ipv4Addr,
    /// Its owner.
    pub owner: u32,
    /// Isolated or shared.
    pub network: NetworkMode,
    /// Its egress list (parsed), empty for no narrowing.
    pub egress: Vec<Egress>,
}

/// Everything the walls depend on besides the guests.
#[derive(Debug, Clone)]
pub struct Walls {
    /// The guest subnet.
    pub subnet: Subnet,
    /// The operator's `allow_egress`.
    pub allow: Vec<Egress>,
    /// The resolvers guests are given (DNS to them passes).
    pub resolvers: Vec<Ipv4Addr>,
}

/// The shared VMs of each owner that has more than one.
fn shared_groups(ports: &[GuestPort]) -> Vec<Vec<&GuestPort>> {
    let mut owners: Vec<u32> = ports
        .iter()
        .filter(|p| p.network == NetworkMode::Shared)
        .map(|p| p.owner)
        .collect();
    owners.sort_unstable();
    owners.dedup();
    owners
        .into_iter()
        .map(|o| {
            ports
                .iter()
                .filter(|p| p.network == NetworkMode::Shared && p.owner == o)
                .collect::<Vec<_>>()
        })
        .filter(|g| g.len() > 1)
        .collect()
}

fn quoted(names: &[&str]) -> String {
    let v: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    format!("{{ {} }}", v.join(", "))
}

impl Walls {
    /// Both tables, replacing what was there, for these guests.
    pub fn ruleset(&self, ports: &[GuestPort]) -> String {
        let mut r = String::new();
        let t = NFT_TABLE;
        // `table X` then `delete table X`: the load replaces each table whether it existed.
        let _ = writeln!(r, "table inet {t}\ndelete table inet {t}");
        let _ = writeln!(r, "table bridge {t}\ndelete table bridge {t}");
        r.push_str(&self.bridge_table(ports));
        r.push_str(&self.inet_table(ports));
        r
    }

    fn bridge_table(&self, ports: &[GuestPort]) -> String {
        let mut r = format!("table bridge {NFT_TABLE} {{\n");
        r.push_str("\tchain prerouting {\n\t\ttype filter hook prerouting priority filter; policy accept;\n");
        for p in ports {
            let (tap, mac, ip) = (&p.tap, &p.mac, p.address);
            let _ = writeln!(r, "\t\tiifname \"{tap}\" ether saddr != {mac} drop");
            let _ = writeln!(
                r,
                "\t\tiifname \"{tap}\" ether type ip ip saddr != {ip} drop"
            );
            let _ = writeln!(
                r,
                "\t\tiifname \"{tap}\" ether type arp arp saddr ether != {mac} drop"
            );
            let _ = writeln!(
                r,
                "\t\tiifname \"{tap}\" ether type arp arp saddr ip != {ip} drop"
            );
            let _ = writeln!(r, "\t\tiifname \"{tap}\" ether type {{ ip, arp }} accept");
            let _ = writeln!(r, "\t\tiifname \"{tap}\" drop");
        }
        // A guest tap with no VM behind it (or IPv6, VLANs, anything else) says nothing.
        r.push_str("\t\tiifname \"bgr*\" drop\n\t}\n");
        r.push_str(
            "\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n",
        );
        for group in shared_groups(ports) {
            let taps: Vec<&str> = group.iter().map(|p| p.tap.as_str()).collect();
            let set = quoted(&taps);
            let _ = writeln!(r, "\t\tiifname {set} oifname {set} accept");
        }
        r.push_str("\t\tiifname \"bgr*\" oifname \"bgr*\" drop\n\t}\n}\n");
        r
    }

    fn inet_table(&self, ports: &[GuestPort]) -> String {
        let subnet = self.subnet;
        let mut r = format!("table inet {NFT_TABLE} {{\n");
        // Guests reach no address of the host, only answer what the host opened.
        r.push_str(&format!(
            "\tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname \"{BRIDGE}\" ct state established,related accept\n\
             \t\tiifname \"{BRIDGE}\" drop\n\t}}\n"
        ));
        r.push_str(
            "\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n",
        );
        // Guest to guest through the host: only shared VMs of one owner (where
        // br_netfilter hands bridged frames to this hook too, the same pairs pass).
        for group in shared_groups(ports) {
            let v: Vec<String> = group.iter().map(|p| p.address.to_string()).collect();
            let set = format!("{{ {} }}", v.join(", "));
            let _ = writeln!(
                r,
                "\t\tiifname \"{BRIDGE}\" oifname \"{BRIDGE}\" ip saddr {set} ip daddr {set} accept"
            );
        }
        r.push_str(&format!(
            "\t\tiifname \"{BRIDGE}\" oifname \"{BRIDGE}\" drop\n\
             \t\tiifname \"{BRIDGE}\" jump guest_out\n\
             \t\toifname \"{BRIDGE}\" ct state established,related accept\n\
             \t\toifname \"{BRIDGE}\" drop\n\t}}\n"
        ));
        r.push_str("\tchain guest_out {\n\t\tmeta nfproto ipv6 drop\n");
        if !self.resolvers.is_empty() {
            let v: Vec<String> = self.resolvers.iter().map(|a| a.to_string()).collect();
            let _ = writeln!(
                r,
                "\t\tip daddr {{ {} }} meta l4proto {{ tcp, udp }} th dport 53 accept",
                v.join(", ")
            );
        }
        if !self.allow.is_empty() {
            let v: Vec<String> = self.allow.iter().map(|a| a.cidr()).collect();
            let _ = writeln!(r, "\t\tip daddr {{ {} }} goto guest_vm", v.join(", "));
        }
        let _ = writeln!(r, "\t\tip daddr {{ {} }} drop", BLOCKED.join(", "));
        r.push_str("\t\tgoto guest_vm\n\t}\n");
        r.push_str("\tchain guest_vm {\n");
        for p in ports.iter().filter(|p| !p.egress.is_empty()) {
            let _ = writeln!(r, "\t\tip saddr {} goto vm_{}", p.address, p.id);
        }
        r.push_str("\t\taccept\n\t}\n");
        for p in ports.iter().filter(|p| !p.egress.is_empty()) {
            let _ = writeln!(r, "\tchain vm_{} {{", p.id);
            for e in &p.egress {
                match e.port {
                    None => {
                        let _ = writeln!(r, "\t\tip daddr {} accept", e.cidr());
                    }
                    Some(port) => {
                        let _ = writeln!(
                            r,
                            "\t\tip daddr {} meta l4proto {{ tcp, udp }} th dport {port} accept",
                            e.cidr()
                        );
                    }
                }
            }
            r.push_str("\t\tdrop\n\t}\n");
        }
        let _ = writeln!(
            r,
            "\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {subnet} ip daddr != {subnet} masquerade\n\t}}\n}}"
        );
        r
    }
}

/// The walls of one VM as `banger vm show` prints them.
pub fn describe(network: NetworkMode, egress: &[String]) -> String {
    let mut s = format!(
        "{}: no host address, {}; private, link-local and shared ranges dropped unless the operator allows them",
        network.as_str(),
        match network {
            NetworkMode::Isolated => "no other guest",
            NetworkMode::Shared => "its owner's other shared VMs",
        }
    );
    if !egress.is_empty() {
        s.push_str(&format!("; egress only to {}", egress.join(", ")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(n: u8, owner: u32, network: NetworkMode, egress: &[&str]) -> GuestPort {
        GuestPort {
            id: format!("00000000000000{n:02x}"),
            tap: format!("bgr0000000000{n:02x}"),
            mac: format!("02:00:00:00:00:{n:02x}"),
            address: Ipv4Addr::new(172, 30, 99, n),
            owner,
            network,
            egress: egress
                .iter()
                .map(|e| Egress::parse(e, "egress", true).unwrap())
                .collect(),
        }
    }

    #[test]
    fn egress_entries_parse_and_bad_ones_name_the_option() {
        let e = Egress::parse("203.0.113.9/24:443", "egress", true).unwrap();
        assert_eq!((e.cidr(), e.port), ("203.0.113.0/24".into(), Some(443)));
        assert_eq!(
            Egress::parse("1.2.3.4", "egress", true).unwrap().cidr(),
            "1.2.3.4/32"
        );
        for bad in [
            "1.2.3.4/33",
            "1.2.3",
            "x/8",
            "1.2.3.4:0",
            "1.2.3.4:99999",
            "::1",
        ] {
            let err = Egress::parse(bad, "egress", true).unwrap_err();
            assert!(err.to_string().starts_with("egress:"), "{bad}: {err}");
        }
        assert!(Egress::parse("10.0.0.0/8:53", "allow_egress", false).is_err());
    }

    #[test]
    fn the_ruleset_walls_guests_in_and_names_only_bangers_tables() {
        let w = Walls {
            subnet: Subnet::new(Ipv4Addr::new(172, 30, 99, 0), 24),
            allow: vec![Egress::parse("10.1.2.0/24", "allow_egress", false).unwrap()],
            resolvers: vec![Ipv4Addr::new(10, 0, 0, 2)],
        };
        let ports = [
            port(2, 1000, NetworkMode::Shared, &[]),
            port(3, 1000, NetworkMode::Shared, &["203.0.113.0/24:443"]),
            port(4, 1000, NetworkMode::Isolated, &[]),
            port(5, 1001, NetworkMode::Shared, &[]),
        ];
        let r = w.ruleset(&ports);
        for line in r.lines().filter(|l| l.contains("table")) {
            assert!(
                line.ends_with("table inet banger")
                    || line.ends_with("table bridge banger")
                    || line.ends_with("banger {"),
                "{line}"
            );
        }
        assert!(r.contains("iifname \"bgr000000000002\" ether saddr != 02:00:00:00:00:02 drop"));
        assert!(r.contains(
            "iifname \"bgr000000000003\" ether type arp arp saddr ip != 172.30.99.3 drop"
        ));
        // Only owner 1000's shared pair may talk; 1001's lone shared VM has nobody.
        assert!(r.contains(
            "iifname { \"bgr000000000002\", \"bgr000000000003\" } oifname { \"bgr000000000002\", \"bgr000000000003\" } accept"
        ));
        assert!(!r.contains("\"bgr000000000004\", "), "{r}");
        assert!(r.contains("iifname \"bgr*\" oifname \"bgr*\" drop"));
        assert!(r.contains(
            "iifname \"banger0\" oifname \"banger0\" ip saddr { 172.30.99.2, 172.30.99.3 } ip daddr { 172.30.99.2, 172.30.99.3 } accept"
        ));
        assert!(r.contains("iifname \"banger0\" drop"));
        assert!(r.contains("ip daddr { 10.1.2.0/24 } goto guest_vm"));
        assert!(r.contains("169.254.0.0/16"));
        assert!(r.contains("ip saddr 172.30.99.3 goto vm_0000000000000003"));
        assert!(r.contains("ip daddr 203.0.113.0/24 meta l4proto { tcp, udp } th dport 443 accept"));
        assert!(r.contains("ip daddr { 10.0.0.2 } meta l4proto { tcp, udp } th dport 53 accept"));
        // The allowed range comes before the blocked ones.
        assert!(r.find("goto guest_vm").unwrap() < r.find("169.254.0.0/16").unwrap());
    }
}
