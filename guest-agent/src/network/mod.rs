//! SetupNetwork: the guest's virtio-net interfaces, found by MAC in the agent's network
//! namespace, move into the pod's (see `sandbox`), get their pod name, MTU and addresses,
//! and come up; then the routes. The agent's own namespace keeps no interface but `lo`,
//! so nothing in the pod can reach a listener of the agent's.
//!
//! Calling it again with the same request is harmless: an interface already in the pod's
//! namespace is configured in place, addresses and routes are replaced.

mod netlink;

use crate::error::{AgentError, Result};
use crate::paths::SANDBOX_DIR;
use cocoon_agent_protocol::api;
use netlink::{Link, LinkChange, Netlink, NlError, RouteSpec};
use nix::sched::CloneFlags;
use std::collections::HashSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Longest interface name (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

fn nl_err(context: impl Into<String>) -> impl FnOnce(NlError) -> AgentError {
    let context = context.into();
    move |e| AgentError::Failed {
        context,
        message: e.to_string(),
    }
}

fn open_netlink(context: &str) -> Result<Netlink> {
    Netlink::open().map_err(AgentError::io(format!(
        "opening a netlink socket {context}"
    )))
}

/// A netlink socket in the network namespace `ns`.
fn netlink_in(ns: &File) -> Result<Netlink> {
    crate::sandbox::in_namespaces(&[(ns, CloneFlags::CLONE_NEWNET)], || {
        open_netlink("in the pod network namespace")
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct InterfaceConfig {
    mac: [u8; 6],
    /// The MAC as lower-case text, for messages.
    mac_text: String,
    name: String,
    mtu: Option<u32>,
    addresses: Vec<(IpAddr, u8)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RouteConfig {
    spec: RouteSpec,
    device: Option<String>,
    /// The route as requested, for messages.
    text: String,
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let bad = || AgentError::InvalidArgument(format!("MAC address {s:?} is not aa:bb:cc:dd:ee:ff"));
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac == [0; 6] {
        return Err(AgentError::InvalidArgument(format!(
            "MAC address {s:?} is all zeros"
        )));
    }
    Ok(mac)
}

fn mac_text(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn validate_ifname(name: &str, what: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_IFNAME {
        return Err(AgentError::InvalidArgument(format!(
            "{what} {name:?} must be 1 to {MAX_IFNAME} bytes"
        )));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(AgentError::InvalidArgument(format!(
            "{what} {name:?} is not a valid interface name"
        )));
    }
    Ok(())
}

/// "10.88.0.5/16" → (10.88.0.5, 16).
fn parse_cidr(s: &str) -> Result<(IpAddr, u8)> {
    let bad = |why: &str| AgentError::InvalidArgument(format!("CIDR {s:?}: {why}"));
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| bad("missing /prefix-length"))?;
    let ip: IpAddr = ip.parse().map_err(|_| bad("not an IP address"))?;
    let len: u8 = len.parse().map_err(|_| bad("bad prefix length"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(bad("prefix length too long"));
    }
    Ok((ip, len))
}

/// `ip` with the bits past `len` cleared (a route's destination is a network).
fn network_of(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

fn parse_interface(i: &api::Interface) -> Result<InterfaceConfig> {
    let mac = parse_mac(&i.mac)?;
    validate_ifname(&i.name, &format!("interface name for MAC {}", i.mac))?;
    let addresses = i
        .addresses
        .iter()
        .map(|a| parse_cidr(a))
        .collect::<Result<Vec<_>>>()?;
    Ok(InterfaceConfig {
        mac,
        mac_text: mac_text(&mac),
        name: i.name.clone(),
        mtu: (i.mtu != 0).then_some(i.mtu),
        addresses,
    })
}

fn parse_route(r: &api::Route) -> Result<RouteConfig> {
    let text = format!(
        "{} via {:?} dev {:?}",
        if r.destination.is_empty() {
            "default"
        } else {
            &r.destination
        },
        r.gateway,
        r.device
    );
    let bad = |why: &str| AgentError::InvalidArgument(format!("route {text}: {why}"));
    let gateway = match r.gateway.as_str() {
        "" => None,
        g => Some(
            g.parse::<IpAddr>()
                .map_err(|_| bad("gateway is not an IP address"))?,
        ),
    };
    let (destination, prefix_len) = match r.destination.as_str() {
        "" | "default" => match gateway {
            Some(IpAddr::V4(_)) => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            Some(IpAddr::V6(_)) => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
            None => return Err(bad("a default route needs a gateway")),
        },
        d => {
            let (ip, len) = parse_cidr(d)?;
            (network_of(ip, len), len)
        }
    };
    if gateway.is_some_and(|g| g.is_ipv4() != destination.is_ipv4()) {
        return Err(bad("gateway and destination are of different IP families"));
    }
    let device = match r.device.as_str() {
        "" => None,
        d => {
            validate_ifname(d, "route device")?;
            Some(d.to_string())
        }
    };
    if gateway.is_none() && device.is_none() {
        return Err(bad("needs a gateway or a device"));
    }
    Ok(RouteConfig {
        spec: RouteSpec {
            destination,
            prefix_len,
            gateway,
            oif: None,
        },
        device,
        text,
    })
}

fn find_mac<'a>(links: &'a [Link], mac: &[u8; 6]) -> Option<&'a Link> {
    links.iter().find(|l| l.mac.as_slice() == mac.as_slice())
}

/// Moves (when needed) and configures one interface.
fn configure_interface(
    host: &mut Netlink,
    pod: &mut Netlink,
    pod_ns: &File,
    cfg: &InterfaceConfig,
) -> Result<()> {
    let mac = &cfg.mac_text;
    let pod_links = pod
        .links()
        .map_err(nl_err("listing the pod's interfaces"))?;
    let link = match find_mac(&pod_links, &cfg.mac) {
        Some(l) => l.clone(),
        None => {
            let host_links = host
                .links()
                .map_err(nl_err("listing the guest's interfaces"))?;
            let l = find_mac(&host_links, &cfg.mac)
                .ok_or_else(|| AgentError::not_found("interface with MAC", mac.clone()))?;
            host.set_link(
                l.index,
                &LinkChange {
                    netns_fd: Some(pod_ns.as_raw_fd()),
                    ..Default::default()
                },
            )
            .map_err(nl_err(format!(
                "moving interface {mac} ({}) into the pod network namespace",
                l.name
            )))?;
            let pod_links = pod
                .links()
                .map_err(nl_err("listing the pod's interfaces"))?;
            find_mac(&pod_links, &cfg.mac)
                .cloned()
                .ok_or_else(|| AgentError::Failed {
                    context: format!("moving interface {mac} into the pod network namespace"),
                    message: "not there after the move".into(),
                })?
        }
    };
    if link.name != cfg.name {
        if link.up {
            pod.set_link(
                link.index,
                &LinkChange {
                    up: Some(false),
                    ..Default::default()
                },
            )
            .map_err(nl_err(format!(
                "taking interface {mac} ({}) down",
                link.name
            )))?;
        }
        pod.set_link(
            link.index,
            &LinkChange {
                name: Some(cfg.name.clone()),
                ..Default::default()
            },
        )
        .map_err(nl_err(format!(
            "renaming interface {mac} from {} to {}",
            link.name, cfg.name
        )))?;
    }
    if let Some(mtu) = cfg.mtu.filter(|m| *m != link.mtu) {
        pod.set_link(
            link.index,
            &LinkChange {
                mtu: Some(mtu),
                ..Default::default()
            },
        )
        .map_err(nl_err(format!("setting MTU {mtu} on {} ({mac})", cfg.name)))?;
    }
    for (ip, len) in &cfg.addresses {
        pod.add_address(link.index, *ip, *len)
            .map_err(nl_err(format!(
                "adding address {ip}/{len} to {} ({mac})",
                cfg.name
            )))?;
    }
    pod.set_link(
        link.index,
        &LinkChange {
            up: Some(true),
            ..Default::default()
        },
    )
    .map_err(nl_err(format!("bringing {} ({mac}) up", cfg.name)))?;
    tracing::info!(
        mac = %mac,
        name = %cfg.name,
        mtu = ?cfg.mtu,
        addresses = ?cfg.addresses,
        "interface configured in the pod network namespace"
    );
    Ok(())
}

/// SetupNetwork: the pod's namespace is the one SetupSandbox made.
pub fn setup(req: &api::SetupNetworkRequest) -> Result<()> {
    let pod_ns = crate::sandbox::open_pod_ns(Path::new(SANDBOX_DIR), "net")?;
    setup_in(&pod_ns, req)
}

/// SetupNetwork into `pod_ns`, from the calling thread's namespace.
fn setup_in(pod_ns: &File, req: &api::SetupNetworkRequest) -> Result<()> {
    // Everything is checked before anything changes.
    let interfaces = req
        .interfaces
        .iter()
        .map(parse_interface)
        .collect::<Result<Vec<_>>>()?;
    let mut macs = HashSet::new();
    let mut names = HashSet::new();
    for i in &interfaces {
        if !macs.insert(i.mac) {
            return Err(AgentError::InvalidArgument(format!(
                "MAC {} is listed twice",
                i.mac_text
            )));
        }
        if !names.insert(i.name.as_str()) {
            return Err(AgentError::InvalidArgument(format!(
                "interface name {} is listed twice",
                i.name
            )));
        }
    }
    let routes = req
        .routes
        .iter()
        .map(parse_route)
        .collect::<Result<Vec<_>>>()?;

    let mut host = open_netlink("in the agent's network namespace")?;
    let mut pod = netlink_in(pod_ns)?;
    for i in &interfaces {
        configure_interface(&mut host, &mut pod, pod_ns, i)?;
    }
    if routes.is_empty() {
        return Ok(());
    }
    let links = pod
        .links()
        .map_err(nl_err("listing the pod's interfaces"))?;
    for r in &routes {
        let mut spec = r.spec.clone();
        if let Some(dev) = &r.device {
            let link = links
                .iter()
                .find(|l| &l.name == dev)
                .ok_or_else(|| AgentError::not_found("interface", dev.clone()))?;
            spec.oif = Some(link.index);
        }
        pod.add_route(&spec)
            .map_err(nl_err(format!("adding route {}", r.text)))?;
        tracing::info!(route = %r.text, "route added in the pod network namespace");
    }
    Ok(())
}

/// Brings `lo` up in the network namespace `ns` (a new namespace has it down).
pub(crate) fn bring_lo_up(ns: &File) -> Result<()> {
    let mut nl = netlink_in(ns)?;
    let links = nl.links().map_err(nl_err("listing the pod's interfaces"))?;
    let lo = links
        .iter()
        .find(|l| l.name == "lo")
        .ok_or_else(|| AgentError::not_found("interface", "lo"))?;
    nl.set_link(
        lo.index,
        &LinkChange {
            up: Some(true),
            ..Default::default()
        },
    )
    .map_err(nl_err("bringing lo up in the pod network namespace"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::test_support::{fresh_netns, in_netns};
    use std::process::Command;

    #[test]
    fn macs_names_and_cidrs() {
        assert_eq!(
            parse_mac("AA:bb:0c:dd:ee:0F").ok(),
            Some([0xaa, 0xbb, 0x0c, 0xdd, 0xee, 0x0f])
        );
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "a:bb:cc:dd:ee:ff",
            "zz:bb:cc:dd:ee:ff",
            "00:00:00:00:00:00",
            "aa-bb-cc-dd-ee-ff",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
        assert_eq!(mac_text(&[0xaa, 0, 1, 2, 3, 0xff]), "aa:00:01:02:03:ff");
        assert!(validate_ifname("eth0", "n").is_ok());
        for bad in ["", "a/b", "a b", "a:1", "..", "0123456789abcdef"] {
            assert!(validate_ifname(bad, "n").is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_cidr("10.88.0.5/16").ok(),
            Some(("10.88.0.5".parse().expect("ip"), 16))
        );
        assert_eq!(
            parse_cidr("fd00::5/64").ok(),
            Some(("fd00::5".parse().expect("ip"), 64))
        );
        for bad in [
            "10.0.0.1",
            "10.0.0.1/33",
            "fd00::/129",
            "x/8",
            "10.0.0.1/-1",
            "10.0.0.1/",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            network_of("10.1.2.3".parse().expect("ip"), 16),
            "10.1.0.0".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            network_of("10.1.2.3".parse().expect("ip"), 0),
            "0.0.0.0".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            network_of("fd00::1:2".parse().expect("ip"), 112),
            "fd00::1:0".parse::<IpAddr>().expect("ip")
        );
    }

    fn route(d: &str, g: &str, dev: &str) -> api::Route {
        api::Route {
            destination: d.into(),
            gateway: g.into(),
            device: dev.into(),
            ..Default::default()
        }
    }

    #[test]
    fn routes_parse() {
        let r = parse_route(&route("", "10.1.0.1", "")).expect("default");
        assert_eq!(r.spec.destination, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(r.spec.prefix_len, 0);
        let r = parse_route(&route("default", "fd00::1", "eth0")).expect("default v6");
        assert_eq!(r.spec.destination, IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        assert_eq!(r.device.as_deref(), Some("eth0"));
        let r = parse_route(&route("192.168.7.9/24", "", "eth0")).expect("link route");
        assert_eq!(
            r.spec.destination,
            "192.168.7.0".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(r.spec.gateway, None);
        for bad in [
            route("", "", "eth0"),
            route("10.0.0.0/8", "", ""),
            route("10.0.0.0/8", "fd00::1", ""),
            route("10.0.0.0/8", "gw", ""),
            route("10.0.0.0", "10.1.0.1", ""),
            route("10.0.0.0/8", "10.1.0.1", "bad/dev"),
        ] {
            let err = parse_route(&bad).expect_err("bad route");
            assert!(matches!(err, AgentError::InvalidArgument(_)), "{err}");
        }
    }

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().expect("ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ip_in(ns: &File, args: &[&str]) -> String {
        in_netns(ns, || ip(args))
    }

    const MAC: &str = "02:C0:C0:00:00:01";

    fn request() -> api::SetupNetworkRequest {
        api::SetupNetworkRequest {
            interfaces: vec![api::Interface {
                mac: MAC.into(),
                name: "eth0".into(),
                mtu: 1400,
                addresses: vec!["10.1.0.5/24".into(), "fd00::5/64".into()],
                ..Default::default()
            }],
            routes: vec![
                route("10.9.9.9/32", "", "eth0"),
                route("", "10.1.0.1", ""),
                route("192.168.7.0/24", "10.1.0.254", "eth0"),
                route("default", "fd00::1", "eth0"),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn moves_and_configures_a_veth_end() {
        // This thread's fresh namespace plays the agent's; both namespaces, and the veth
        // pair with them, vanish when the thread and the fd are gone, on failure too.
        std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare net");
            ip(&[
                "link", "add", "gst0", "type", "veth", "peer", "name", "peer0",
            ]);
            ip(&["link", "set", "gst0", "address", MAC]);
            ip(&["link", "set", "peer0", "up"]);
            let pod = fresh_netns();

            setup_in(&pod, &request()).expect("setup");
            let link = ip_in(&pod, &["-o", "link", "show", "eth0"]);
            assert!(link.contains("mtu 1400"), "{link}");
            assert!(link.contains(",UP") || link.contains("<UP"), "{link}");
            assert!(link.contains(&MAC.to_lowercase()), "{link}");
            let addrs = ip_in(&pod, &["-o", "addr", "show", "dev", "eth0"]);
            assert!(addrs.contains("inet 10.1.0.5/24"), "{addrs}");
            assert!(addrs.contains("inet6 fd00::5/64"), "{addrs}");
            let v6 = addrs
                .lines()
                .find(|l| l.contains("fd00::5"))
                .unwrap_or_default();
            assert!(!v6.contains("tentative"), "{addrs}");
            let routes = ip_in(&pod, &["route", "show"]);
            assert!(routes.contains("default via 10.1.0.1 dev eth0"), "{routes}");
            assert!(routes.contains("10.9.9.9 dev eth0 scope link"), "{routes}");
            assert!(
                routes.contains("192.168.7.0/24 via 10.1.0.254 dev eth0"),
                "{routes}"
            );
            let routes6 = ip_in(&pod, &["-6", "route", "show"]);
            assert!(
                routes6.contains("default via fd00::1 dev eth0"),
                "{routes6}"
            );
            // Gone from the agent's namespace.
            let here = ip(&["-o", "link", "show"]);
            assert!(!here.contains("gst0"), "{here}");

            // Again: the interface is found in the pod's namespace, nothing fails.
            setup_in(&pod, &request()).expect("setup again");
            let addrs = ip_in(&pod, &["-o", "-4", "addr", "show", "dev", "eth0"]);
            assert_eq!(addrs.lines().count(), 1, "{addrs}");

            // Unknown MAC.
            let mut req = request();
            req.interfaces[0].mac = "02:c0:c0:00:00:99".into();
            req.routes.clear();
            let err = setup_in(&pod, &req).expect_err("unknown MAC");
            assert!(matches!(err, AgentError::NotFound { .. }), "{err}");
            assert!(err.to_string().contains("02:c0:c0:00:00:99"), "{err}");

            // A gateway nothing leads to: the kernel's refusal names the route.
            let req = api::SetupNetworkRequest {
                routes: vec![route("172.30.0.0/16", "172.31.0.1", "")],
                ..Default::default()
            };
            let err = setup_in(&pod, &req).expect_err("unreachable gateway");
            assert!(
                err.to_string().contains("adding route 172.30.0.0/16"),
                "{err}"
            );

            // A route naming a device the pod does not have.
            let req = api::SetupNetworkRequest {
                routes: vec![route("172.30.0.0/16", "", "eth9")],
                ..Default::default()
            };
            let err = setup_in(&pod, &req).expect_err("no such device");
            assert!(matches!(err, AgentError::NotFound { .. }), "{err}");

            // lo comes up on request.
            bring_lo_up(&pod).expect("lo up");
            let lo = ip_in(&pod, &["-o", "link", "show", "lo"]);
            assert!(lo.contains(",UP"), "{lo}");
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    }
}
