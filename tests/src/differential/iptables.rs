//! The iptables renderer against the same model: the rules the iptables backend writes for
//! a random policy, evaluated in pure code (`tailgate::explain::iptables::evaluate`: first
//! match per chain, netfilter's order), and the model's hooks composed along the same path
//! (an uplink's XDP, then the tunnel's egress; the tunnel's ingress, then the masquerade),
//! on the first packet of a connection (netfilter's conntrack answers the rest as the first
//! was answered). Compared: what happens to the packet (dropped, delivered, forwarded,
//! sent), the mark, the MSS, the source after masquerade, the prefix rule that decided.

use std::{collections::HashMap, fmt, net::IpAddr};

use anyhow::{Context, Result};
use proptest::prelude::*;
use tailgate::{
    config::Config,
    explain::{
        iptables::{evaluate_as, Given, Lists},
        packet::{self, Described, Flags, Proto},
        Device,
    },
    policy::{self, DesiredState},
};

use super::{Pick, Policy};
use crate::{
    model::{self, flows::Flows, Env, Hook, Skb, Verdict},
    testrun as tr,
};

const TUNNEL: &str = "tun0";
const UPLINK: &str = "eth0";
const TUNNEL_INDEX: u32 = 1;
const UPLINK_INDEX: u32 = 7;
/// The gateway's addresses: its LAN side (the masquerade's source) and its tailnet side.
const LAN_V4: &str = "192.0.2.1";
const LAN_V6: &str = "2001:db8::1";
const TAILNET_V4: &str = "100.101.0.1";
const TAILNET_V6: &str = "fd7a:115c:a1e0::1";

/// Where the packet goes through the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// From the LAN to the gateway itself.
    LanToHost,
    /// From the LAN into the tunnel.
    LanToTunnel,
    /// From the tunnel to the LAN (a subnet route).
    TunnelToLan,
    /// From the tunnel to the gateway itself.
    TunnelToHost,
    /// The gateway's own packet out of the uplink.
    HostToLan,
}

/// A first packet of a connection, as `explain` describes one.
#[derive(Debug, Clone)]
pub struct First {
    pub path: Path,
    pub v6: bool,
    pub src: Pick,
    /// For paths to the gateway: one of its addresses.
    pub dst: Pick,
    pub proto: Proto,
    pub sport: u16,
    pub dport: u16,
    pub flags: (bool, bool, bool, bool),
    pub mss: Option<u16>,
}

pub fn first() -> impl Strategy<Value = First> {
    let path = prop::sample::select(vec![
        Path::LanToHost,
        Path::LanToTunnel,
        Path::TunnelToLan,
        Path::TunnelToHost,
        Path::HostToLan,
    ]);
    let mss = prop::option::of(prop_oneof![
        any::<u16>(),
        prop::sample::select(vec![536u16, 1199, 1200, 1201, 1220, 1221, 1240, 1241, 1400, 1460]),
    ]);
    (
        path,
        any::<bool>(),
        (super::picks(), super::picks()),
        prop::sample::select(vec![Proto::Tcp, Proto::Tcp, Proto::Udp, Proto::Icmp]),
        (any::<u16>(), 1u16..),
        (any::<bool>(), any::<bool>(), any::<bool>(), prop::bool::weighted(0.1)),
        mss,
    )
        .prop_map(|(path, v6, (src, dst), proto, (sport, dport), flags, mss)| First {
            path,
            v6,
            src,
            dst,
            proto,
            sport,
            dport,
            flags,
            mss,
        })
}

/// The comparable result of either side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fate {
    /// drop, deliver, forward, send.
    pub verdict: &'static str,
    pub mark: u32,
    pub mss: Option<u16>,
    pub src: IpAddr,
    /// The prefix rule that dropped the packet. (Pass rules are not compared: the uplink's
    /// XDP judges every packet entering, iptables INPUT and FORWARD each their own; which
    /// pass rule a packet met on the way is not what decides its fate.)
    pub rule: Option<String>,
}

/// What differed.
#[derive(Debug, Clone)]
pub struct Mismatch {
    pub policy: String,
    pub packet: Described,
    pub path: Path,
    pub model: Fate,
    pub iptables: Fate,
    pub steps: Vec<String>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "the iptables rules and the model differ\npolicy:\n{}", self.policy)?;
        writeln!(f, "path: {:?}\npacket: {:?}", self.path, self.packet)?;
        for step in &self.steps {
            writeln!(f, "  iptables: {step}")?;
        }
        writeln!(f, "model:    {:?}", self.model)?;
        write!(f, "iptables: {:?}", self.iptables)
    }
}

/// The desired state of `policy` on a gateway with uplink eth0 and tunnel tun0.
fn state(policy: &Policy) -> Result<DesiredState> {
    let toml = format!("tunnel = {TUNNEL:?}\n{}", policy.toml());
    let config = Config::parse(&toml, &HashMap::new()).context("the random policy's config")?;
    let system = policy::System { uplinks: vec![UPLINK.into()], ..tr::system() };
    Ok(policy::compile(&config, system))
}

/// One first packet through both; the mismatch, if any.
pub fn check(policy: &Policy, first: &First) -> Result<Option<Box<Mismatch>>> {
    let state = state(policy)?;
    let pool = policy.pool();
    let local: Vec<IpAddr> =
        [LAN_V4, LAN_V6, TAILNET_V4, TAILNET_V6].iter().map(|a| a.parse().unwrap()).collect();
    let to_host = matches!(first.path, Path::LanToHost | Path::TunnelToHost);
    let family = |a: &IpAddr| a.is_ipv6() == first.v6;
    let src = super::address(&first.src, &pool, first.v6);
    let dst = if to_host {
        let own: Vec<IpAddr> = local.iter().copied().filter(family).collect();
        match &first.dst {
            Pick::Pool(i) => own[i.index(own.len())],
            Pick::Any(bits) => own[*bits as usize % own.len()],
        }
    } else {
        super::address(&first.dst, &pool, first.v6)
    };
    // A forwarded packet is not for the gateway, and the gateway's own comes from it.
    let (src, dst) = match first.path {
        Path::HostToLan => (local.iter().copied().find(|a| family(a)).unwrap(), dst),
        _ if !to_host && local.contains(&dst) => return Ok(None),
        _ => (src, dst),
    };
    let tcp = first.proto == Proto::Tcp;
    let (syn, ack, fin, rst) = first.flags;
    let described = Described {
        proto: first.proto,
        src,
        dst,
        sport: first.sport,
        dport: if first.proto == Proto::Icmp { 0 } else { first.dport },
        flags: tcp.then_some(Flags { syn, ack, fin, rst, psh: false }),
        mss: first.mss.filter(|_| tcp && syn),
    };
    let mut model = model_fate(&state, &described, first.path)?;
    let (mut iptables, steps) = iptables_fate(&state, &described, first.path, &local)?;
    // The mark and the MSS clamp are for forwarded packets (routing, the masquerade, the
    // tunnel's MTU). The datapath marks and clamps every packet from the tunnel at its
    // ingress, iptables in FORWARD only: a packet for the gateway itself is marked (and a
    // SYN's MSS lowered to what the tunnel carries anyway) by one and not the other (README).
    if !matches!(first.path, Path::LanToTunnel | Path::TunnelToLan) {
        (model.mark, iptables.mark) = (0, 0);
        (model.mss, iptables.mss) = (None, None);
    }
    // From the LAN into the tunnel with the stateful filter, both drop what no flow from the
    // tunnel opened; the datapath's uplink XDP may have dropped it by an inbound rule
    // before, iptables (no inbound rules in FORWARD) by the stateful rule: the same fate,
    // another rule.
    if first.path == Path::LanToTunnel && state.conntrack.stateful {
        (model.rule, iptables.rule) = (None, None);
    }
    if model == iptables {
        return Ok(None);
    }
    Ok(Some(Box::new(Mismatch {
        policy: policy.toml(),
        packet: described,
        path: first.path,
        model,
        iptables,
        steps,
    })))
}

fn device(name: &str) -> Device {
    let (index, mtu) = if name == TUNNEL { (TUNNEL_INDEX, 1280) } else { (UPLINK_INDEX, 1500) };
    Device { name: name.into(), index, mtu: Some(mtu) }
}

fn iptables_fate(
    state: &DesiredState,
    described: &Described,
    path: Path,
    local: &[IpAddr],
) -> Result<(Fate, Vec<String>)> {
    let (input, output) = match path {
        Path::LanToHost => (Some(UPLINK), None),
        Path::LanToTunnel => (Some(UPLINK), Some(TUNNEL)),
        Path::TunnelToLan => (Some(TUNNEL), Some(UPLINK)),
        Path::TunnelToHost => (Some(TUNNEL), None),
        Path::HostToLan => (None, Some(UPLINK)),
    };
    let source = if described.src.is_ipv6() { LAN_V6 } else { LAN_V4 }.parse()?;
    let given = Given { route: output.map(device), source, local: local.to_vec() };
    // Forwarded: routed to `output`; delivered: no output given, `route` says local.
    let out_dev = if input.is_none() { output.map(device) } else { None };
    let (input, out_dev) = (input.map(device), out_dev.as_ref());
    let report = evaluate_as(state, Lists::InSets, described, input.as_ref(), out_dev, &given)?;
    // Without ipset the lists are rules, longest prefix first: the same answer.
    let as_rules = evaluate_as(state, Lists::AsRules, described, input.as_ref(), out_dev, &given)?;
    if (&as_rules.verdict, as_rules.mark, &as_rules.result, &as_rules.rule)
        != (&report.verdict, report.mark, &report.result, &report.rule)
    {
        anyhow::bail!("prefix lists in sets and as rules disagree:\n{report:?}\n{as_rules:?}");
    }
    let after = report.result.clone();
    let fate = Fate {
        verdict: report.verdict,
        mark: report.mark,
        mss: after.as_ref().and_then(|s| s.mss).or(described.mss.filter(|_| report.verdict == "drop")),
        src: after.map_or(described.src, |s| s.src),
        rule: report.rule.filter(|r| r.verdict == "drop" && report.verdict == "drop").map(|r| r.prefix),
    };
    let steps = report.steps.iter().map(|s| format!("{} {} {:?}", s.hook, s.result, s.matched)).collect();
    Ok((fate, steps))
}

/// The model's hooks along `path`.
fn model_fate(state: &DesiredState, described: &Described, path: Path) -> Result<Fate> {
    let frame = packet::build(described)?;
    let env = Env { tunnel_l3: 14, now: super::monotonic() };
    let mut flows = Flows::default();
    let mut run = |hook: Hook, frame: &[u8], skb: Skb| model::run(state, &mut flows, env, hook, frame, skb);
    let mut rule = None;
    let mut mark = 0;
    let mut frame = frame;
    let lan = Skb { mark: 0, ingress_ifindex: UPLINK_INDEX, ifindex: UPLINK_INDEX };
    let verdict = match path {
        Path::LanToHost | Path::LanToTunnel => {
            let first = run(Hook::Uplink, &frame, lan);
            if first.verdict == Verdict::Drop {
                rule = first.rule;
                "drop"
            } else if path == Path::LanToHost {
                "deliver"
            } else {
                let skb = Skb { mark: 0, ingress_ifindex: UPLINK_INDEX, ifindex: TUNNEL_INDEX };
                let out = run(Hook::TunnelEgress, &frame, skb);
                frame = out.frame;
                if out.verdict == Verdict::Drop {
                    rule = out.rule.filter(|hit| hit.drop);
                    "drop"
                } else {
                    "forward"
                }
            }
        }
        Path::TunnelToLan | Path::TunnelToHost => {
            let skb = Skb { mark: 0, ingress_ifindex: TUNNEL_INDEX, ifindex: TUNNEL_INDEX };
            let out = run(Hook::TunnelIngress, &frame, skb);
            mark = out.mark;
            frame = out.frame;
            if path == Path::TunnelToHost {
                "deliver"
            } else {
                "forward"
            }
        }
        Path::HostToLan => {
            let skb = Skb { mark: 0, ingress_ifindex: 0, ifindex: UPLINK_INDEX };
            run(Hook::UplinkEgress, &frame, skb);
            "send"
        }
    };
    let seen = packet::read(&frame).context("reading the model's packet back")?;
    // The masquerade: marked packets from the tunnel leave with the uplink's address.
    let masqueraded = path == Path::TunnelToLan
        && state.subnet_routes.masquerade
        && mark & state.subnet_routes.mark.mask == state.subnet_routes.mark.value;
    let src = match (masqueraded, seen.src) {
        (true, IpAddr::V4(_)) => LAN_V4.parse()?,
        (true, IpAddr::V6(_)) => LAN_V6.parse()?,
        (false, src) => src,
    };
    Ok(Fate { verdict, mark, mss: seen.mss, src, rule: rule.map(|h| h.prefix.to_string()) })
}
