//! tailgate's kernel programs: the entry points, each one pipeline over one packet
//! description. Stages live in their own modules and only decide; the entry point applies
//! rewrites, counts and returns the verdict.
//!
//! | hook (program)                          | stages, in order                            |
//! |-----------------------------------------|---------------------------------------------|
//! | uplink XDP (`tg_uplink`)                | cgnat (inbound); a drop: conntrack (reply?) |
//! | uplink TC egress (`tg_uplink_egress`)   | conntrack (record the gateway's own flows)  |
//! | tunnel TC ingress (`tg_service_in`)     | proxy (egress replies back), services (DNAT), with services or proxies only |
//! | tunnel TC ingress (`tg_tunnel_ingress`) | conntrack (record), mark, mss               |
//! | tunnel TC egress (`tg_tunnel_egress`)   | conntrack (stateful), cgnat (forward), masquerade (inbound), mss |
//! | tunnel TC egress (`tg_service_out`)     | services (reverse NAT), with services only  |
//! | tunnel TC egress (`tg_proxy_out`)       | proxy (egress SNAT), with the egress proxy only |
//! | uplink TC ingress (`tg_service_uplink_in`), egress (`tg_service_uplink_out`) | the same for LAN clients (and the egress proxy's DNAT) |
//! | uplink TC ingress (`tg_masquerade_in`)  | masquerade (replies back), while masquerading |
//! | uplink TC egress (`tg_masquerade_out`)  | masquerade (SNAT), first, while masquerading |
//!
//! The crate builds only for `bpfel-unknown-none` (see `userspace/build.rs`); on the host it
//! is an empty binary so `cargo clippy --workspace` and `cargo test --workspace` work.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod cgnat;
#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod counters;
#[cfg(target_arch = "bpf")]
mod icmp_error;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod mark;
#[cfg(target_arch = "bpf")]
mod masquerade;
#[cfg(target_arch = "bpf")]
mod mss;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod proxy;
#[cfg(target_arch = "bpf")]
mod services;
#[cfg(target_arch = "bpf")]
mod snat;
#[cfg(target_arch = "bpf")]
mod stage;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };
    use aya_log_ebpf::debug;
    use tailgate_abi::{
        conntrack::zone,
        counters::Counter,
        settings::{stage, Settings},
    };

    use crate::{
        cgnat,
        conntrack::{self, At, Bytes},
        counters::count,
        icmp_error,
        maps::{generation, settings, TUNNEL_L3_OFFSET},
        mark, masquerade,
        mss::{self, Clamp},
        nat,
        parse::{self, Link, NoPacket},
        proxy,
        services::{self, Dnat},
        snat::{self, Snat},
        stage::{ErrorRewrite, NatRewrite, Rewrite, Verdict},
    };

    /// XDP on every uplink: drops packets whose source is in a filtered range (CGNAT,
    /// tailnet ULA) unless the policy exempts it, or (`allow_replies`) it answers a flow the
    /// gateway opened out of this uplink.
    #[xdp]
    pub fn tg_uplink(ctx: XdpContext) -> u32 {
        let bytes = Bytes { data: ctx.data(), data_end: ctx.data_end() };
        let verdict = match parse::ethernet(bytes.data, bytes.data_end) {
            Ok(packet) => {
                let generation = generation();
                match cgnat::inbound(&packet, generation) {
                    // Settings and flows are read on the drop path only: passing traffic
                    // pays nothing for them.
                    Verdict::Drop(reason) => {
                        let replies = settings(generation).stages & stage::OWN_FLOWS != 0;
                        if replies && conntrack::reply(&packet, bytes, At::own(ctx.ingress_ifindex() as u32))
                        {
                            Verdict::Pass(Counter::UplinkPassReply)
                        } else {
                            Verdict::Drop(reason)
                        }
                    }
                    pass => pass,
                }
            }
            Err(NoPacket::NotIp) => Verdict::Pass(Counter::UplinkPassNotIp),
            Err(NoPacket::Malformed) => Verdict::Pass(Counter::UplinkPassMalformed),
        };
        match verdict {
            Verdict::Pass(reason) => {
                count(reason);
                xdp_action::XDP_PASS
            }
            Verdict::Drop(reason) => {
                debug!(&ctx, "uplink: drop");
                count(reason);
                xdp_action::XDP_DROP
            }
        }
    }

    /// TC egress on every uplink: records the gateway's own flows towards addresses whose
    /// replies the inbound filter would drop (`allow_replies`), and its UDP flows while the
    /// egress proxy is on (their answers are not the proxy's). Never drops; passes on to
    /// the programs after it (the services' reverse NAT).
    #[classifier]
    pub fn tg_uplink_egress(ctx: TcContext) -> i32 {
        // SAFETY: the context pointer is valid for the program's run.
        let (ingress, ifindex) = unsafe { ((*ctx.skb.skb).ingress_ifindex, (*ctx.skb.skb).ifindex) };
        // Forwarded packets came in on a device: only the gateway's own are recorded.
        if ingress != 0 {
            return TCX_NEXT;
        }
        let generation = generation();
        let stages = settings(generation).stages;
        if stages & (stage::OWN_FLOWS | stage::EGRESS_PROXY) == 0 {
            return TCX_NEXT;
        }
        if let Ok(packet) = parse::skb(&ctx, Link::Ethernet) {
            // The egress proxy leaves UDP answers to the gateway's own flows alone (TCP: it
            // takes only SYNs).
            let proxy = stages & stage::EGRESS_PROXY != 0 && packet.proto == parse::IPPROTO_UDP;
            if proxy || cgnat::replies_filtered(&packet, generation) {
                let bytes = Bytes { data: ctx.data(), data_end: ctx.data_end() };
                conntrack::record(&packet, bytes, At::own(ifindex));
            }
        }
        TCX_NEXT
    }

    /// TC ingress on the tunnel: records flows opened from the tunnel (`stateful`; the egress
    /// proxy's target's), marks packets for subnet routes and clamps the MSS of SYNs coming
    /// out of the tunnel.
    #[classifier]
    pub fn tg_tunnel_ingress(ctx: TcContext) -> i32 {
        let packet = match parse::skb(&ctx, Link::Ip(TUNNEL_L3_OFFSET.load() as usize)) {
            Ok(packet) => packet,
            Err(_) => return pass(Counter::TunnelInPassOther),
        };
        let generation = generation();
        let settings = settings(generation);
        // SAFETY: the context pointer is valid for the program's run.
        let (current, ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ifindex) };
        // Before the clamp: a rewrite invalidates the packet pointers.
        let bytes = || Bytes { data: ctx.data(), data_end: ctx.data_end() };
        if settings.stages & stage::STATEFUL != 0 {
            conntrack::record(&packet, bytes(), At::tunnel(ifindex));
        } else if proxy::from_target(&packet, &settings) {
            proxy::record_target(&packet, bytes(), ifindex);
        }
        if let Some(rewrite) = mark::from_tunnel(current, &settings) {
            apply(&ctx, rewrite, Counter::TunnelInMarked);
        }
        clamp(&ctx, mss::clamp(&ctx, &packet, &settings), Counter::TunnelInMssClamped);
        pass(Counter::TunnelInPass)
    }

    /// TC egress on the tunnel: with `stateful`, drops forwarded packets that are not part
    /// of a flow opened from the tunnel; drops forwarded packets with a filtered source that
    /// did not come in through the tunnel (reference rule ts-forward 3); clamps the MSS of
    /// SYNs going into the tunnel.
    #[classifier]
    pub fn tg_tunnel_egress(ctx: TcContext) -> i32 {
        let packet = match parse::skb(&ctx, Link::Ip(TUNNEL_L3_OFFSET.load() as usize)) {
            Ok(packet) => packet,
            Err(_) => return next(Counter::TunnelPassOther),
        };
        let generation = generation();
        let settings = settings(generation);
        // SAFETY: the context pointer is valid for the program's run.
        let origin = unsafe {
            cgnat::Origin { ingress_ifindex: (*ctx.skb.skb).ingress_ifindex, ifindex: (*ctx.skb.skb).ifindex }
        };
        let stateful = settings.stages & stage::STATEFUL != 0 && origin.forwarded();
        // As the reference's rule order: the stateful drop comes before the prefix rules (an
        // exempt source does not get past it).
        let bytes = || Bytes { data: ctx.data(), data_end: ctx.data_end() };
        let answers = stateful && conntrack::reply(&packet, bytes(), At::tunnel(origin.ifindex));
        let verdict = if stateful && !answers {
            Verdict::Drop(Counter::TunnelDropStateful)
        } else {
            match cgnat::into_tunnel(&packet, &origin, generation) {
                Verdict::Pass(Counter::TunnelPassForward) if stateful => {
                    Verdict::Pass(Counter::TunnelPassEstablished)
                }
                verdict => verdict,
            }
        };
        let reason = match verdict {
            Verdict::Pass(reason) => reason,
            Verdict::Drop(reason) => {
                debug!(&ctx, "tunnel egress: drop forwarded");
                count(reason);
                return TC_ACT_SHOT as i32;
            }
        };
        // Connections from the LAN side into the tunnel: the masquerade leaves their replies.
        // (A reply to a flow from the tunnel is none.)
        if settings.stages & stage::MASQUERADE != 0 && origin.forwarded() && !answers {
            masquerade::record_inbound(&packet, bytes(), origin.ingress_ifindex, origin.ifindex);
        }
        if mss::applies(&packet) {
            clamp(&ctx, mss::clamp(&ctx, &packet, &settings), Counter::TunnelOutMssClamped);
        }
        next(reason)
    }

    /// TC ingress on the tunnel, before `tg_tunnel_ingress`, attached while services or
    /// proxies are configured: translates the egress proxy target's replies back, sends
    /// packets to a service to a backend. A program of its own: the stages of one call
    /// chain share 512 bytes of stack.
    #[classifier]
    pub fn tg_service_in(ctx: TcContext) -> i32 {
        let Ok(packet) = nat_packet(&ctx, Link::Ip(TUNNEL_L3_OFFSET.load() as usize)) else {
            return TCX_NEXT;
        };
        let generation = generation();
        let settings = settings(generation);
        // First: a reply for the gateway's tailnet address (or an ICMP error about a packet
        // sent to the target) is not the ingress proxy's.
        if settings.stages & stage::EGRESS_PROXY != 0 && snat_reply(&ctx, &packet, &settings) {
            count(Counter::EgressProxyReplies);
            return TCX_NEXT;
        }
        service_in(&ctx, &packet, (generation, false))
    }

    /// TC egress on the tunnel, after `tg_tunnel_egress` (whose filters judge a reply as
    /// netfilter's FORWARD does, before its source is translated back in POSTROUTING),
    /// attached while services are configured: translates backends' replies back to the
    /// service's address.
    #[classifier]
    pub fn tg_service_out(ctx: TcContext) -> i32 {
        if let Ok(packet) = nat_packet(&ctx, Link::Ip(TUNNEL_L3_OFFSET.load() as usize)) {
            service_out(&ctx, &packet);
        }
        TCX_NEXT
    }

    /// TC ingress on every uplink, last (after the masquerade's replies), while services or
    /// proxies are configured: packets to a service from LAN clients (after the XDP filter)
    /// go to a backend, packets for the gateway to the egress proxy's target.
    #[classifier]
    pub fn tg_service_uplink_in(ctx: TcContext) -> i32 {
        let Ok(packet) = nat_packet(&ctx, Link::Ethernet) else { return TCX_NEXT };
        service_in(&ctx, &packet, (generation(), true))
    }

    /// TC egress on every uplink, last: backends' replies to LAN clients translated back.
    #[classifier]
    pub fn tg_service_uplink_out(ctx: TcContext) -> i32 {
        if let Ok(packet) = nat_packet(&ctx, Link::Ethernet) {
            service_out(&ctx, &packet);
        }
        TCX_NEXT
    }

    /// TC ingress on every uplink, first (after the XDP filter), while masquerading:
    /// replies to masqueraded flows go back to their client.
    #[classifier]
    pub fn tg_masquerade_in(ctx: TcContext) -> i32 {
        let settings = settings(generation());
        if settings.stages & stage::MASQUERADE == 0 {
            return TCX_NEXT;
        }
        let Ok(packet) = nat_packet(&ctx, Link::Ethernet) else { return TCX_NEXT };
        if snat_reply(&ctx, &packet, &settings) {
            count(Counter::Unmasqueraded);
        }
        TCX_NEXT
    }

    /// A reply to a flow the SNAT engine translated on this device, or an ICMP error about
    /// one of its packets, translated back to the client; whether it was one (and took).
    #[inline(always)]
    fn snat_reply(ctx: &TcContext, packet: &parse::Packet, settings: &Settings) -> bool {
        // SAFETY: the context pointer is valid for the program's run.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        let bytes = Bytes { data: ctx.data(), data_end: ctx.data_end() };
        let mut nat = NatRewrite::EMPTY;
        if snat::reverse(packet, bytes, settings.nat_ports, ifindex, &mut nat) {
            return rewritten(ctx, Rewrite::Nat(nat));
        }
        // An ICMP error (no ports of its own) about one of the flows' packets.
        let mut error = ErrorRewrite::EMPTY;
        let reply = At { zone: zone::SNAT_REPLY, ifindex };
        icmp_error::reverse(packet, bytes, reply, &mut error) && nat::translate_error(ctx, &error)
    }

    /// TC egress on every uplink, first, while masquerading: marked packets from the tunnel
    /// get the uplink's address. First: before the services' reverse NAT, so that a
    /// backend's reply is still seen as the reply it is (the connection came from the LAN).
    #[classifier]
    pub fn tg_masquerade_out(ctx: TcContext) -> i32 {
        let settings = settings(generation());
        // SAFETY: the context pointer is valid for the program's run.
        let (ingress, ifindex, mark) =
            unsafe { ((*ctx.skb.skb).ingress_ifindex, (*ctx.skb.skb).ifindex, (*ctx.skb.skb).mark) };
        // Forwarded and carrying the subnet-route mark: from the tunnel.
        if settings.stages & stage::MASQUERADE == 0
            || ingress == 0
            || mark & settings.mark_mask != settings.mark_value
        {
            return TCX_NEXT;
        }
        let Ok(packet) = nat_packet(&ctx, Link::Ethernet) else { return TCX_NEXT };
        let mut nat = NatRewrite::EMPTY;
        let bytes = Bytes { data: ctx.data(), data_end: ctx.data_end() };
        let snat =
            masquerade::snat(&packet, bytes, &settings, (ctx.skb.skb.cast(), ifindex, ingress), &mut nat);
        // Never sent out with its tailnet source.
        snat_verdict(&ctx, snat, nat, [Counter::Masqueraded, Counter::MasqueradeNew, Counter::MasqueradeDrop])
    }

    /// Applies the SNAT's outcome: the rewrite (counted as `translated`, and `new` for a flow
    /// it opened), or a drop (`drop`) when it cannot translate or the rewrite did not take.
    #[inline(always)]
    fn snat_verdict(
        ctx: &TcContext,
        snat: Snat,
        nat: NatRewrite,
        [translated, new, drop]: [Counter; 3],
    ) -> i32 {
        match snat {
            Snat::None => TCX_NEXT,
            Snat::To | Snat::New if rewritten(ctx, Rewrite::Nat(nat)) => {
                if let Snat::New = snat {
                    count(new);
                }
                next(translated)
            }
            _ => {
                count(drop);
                TC_ACT_SHOT as i32
            }
        }
    }

    /// TC egress on the tunnel, last, with the egress proxy: packets forwarded to its
    /// target get the gateway's tailnet address. After `tg_tunnel_egress`, whose filters
    /// judge the packet by its source before the translation (as netfilter's FORWARD
    /// before POSTROUTING): the gateway's tailnet source is not a LAN host's forged one.
    #[classifier]
    pub fn tg_proxy_out(ctx: TcContext) -> i32 {
        // SAFETY: the context pointer is valid for the program's run.
        let (ingress, ifindex) = unsafe { ((*ctx.skb.skb).ingress_ifindex, (*ctx.skb.skb).ifindex) };
        // The gateway's own packets have its tailnet address already.
        if ingress == 0 {
            return TCX_NEXT;
        }
        let settings = settings(generation());
        if settings.stages & stage::EGRESS_PROXY == 0 {
            return TCX_NEXT;
        }
        let Ok(packet) = nat_packet(&ctx, Link::Ip(TUNNEL_L3_OFFSET.load() as usize)) else {
            return TCX_NEXT;
        };
        if !proxy::to_target(&packet, &settings) {
            return TCX_NEXT;
        }
        let mut nat = NatRewrite::EMPTY;
        let bytes = Bytes { data: ctx.data(), data_end: ctx.data_end() };
        let snat = proxy::snat(&packet, bytes, &settings, ifindex, &mut nat);
        snat_verdict(
            &ctx,
            snat,
            nat,
            [Counter::EgressProxied, Counter::EgressProxyNew, Counter::EgressProxyDrop],
        )
    }

    #[inline(always)]
    fn service_in(ctx: &TcContext, packet: &parse::Packet, at: (u8, bool)) -> i32 {
        // SAFETY: the context pointer is valid for the program's run.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        let mut nat = NatRewrite::EMPTY;
        let bytes = Bytes { data: ctx.data(), data_end: ctx.data_end() };
        match services::dnat(packet, bytes, at, ifindex, &mut nat) {
            Dnat::None => TCX_NEXT,
            Dnat::To if rewritten(ctx, Rewrite::Nat(nat)) => {
                count(Counter::ServiceDnat);
                TCX_NEXT
            }
            // Refused, or half rewritten: never sent on to the service's address.
            _ => {
                count(Counter::ServiceDrop);
                TC_ACT_SHOT as i32
            }
        }
    }

    /// A backend's reply (or an ICMP error about a packet sent to one) translated back;
    /// whether the packet was one.
    #[inline(always)]
    fn service_out(ctx: &TcContext, packet: &parse::Packet) -> bool {
        // SAFETY: the context pointer is valid for the program's run.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        let mut nat = NatRewrite::EMPTY;
        let bytes = Bytes { data: ctx.data(), data_end: ctx.data_end() };
        if services::reverse(packet, bytes, ifindex, &mut nat) {
            apply(ctx, Rewrite::Nat(nat), Counter::ServiceReverseNat);
            return true;
        }
        let mut error = ErrorRewrite::EMPTY;
        if icmp_error::reverse(packet, bytes, At { zone: zone::DNAT_REPLY, ifindex }, &mut error) {
            if nat::translate_error(ctx, &error) {
                count(Counter::ServiceIcmpTranslated);
            }
            return true;
        }
        false
    }

    /// The packet of a NAT program. The headers are pulled into the linear buffer
    /// first when they are not all there: one parse, no retry loop, whose spills would leave
    /// too little of the 512 bytes of stack a call chain shares for the stage.
    #[inline(always)]
    fn nat_packet(ctx: &TcContext, link: Link) -> Result<parse::Packet, NoPacket> {
        let l3 = match link {
            Link::Ethernet => parse::MAX_L2_LEN,
            Link::Ip(l3) => l3,
        };
        let want = core::cmp::min(ctx.len(), (l3 + parse::PULL_LEN) as u32);
        if (ctx.data_end() - ctx.data()) < want as usize {
            let _ = ctx.pull_data(want);
        }
        match link {
            Link::Ethernet => parse::ethernet(ctx.data(), ctx.data_end()),
            Link::Ip(l3) => parse::ip(ctx.data(), ctx.data_end(), l3),
        }
    }

    /// TCX: let the next program at this hook see the packet (the last one's `TCX_NEXT`
    /// passes it).
    const TCX_NEXT: i32 = -1;

    /// Passes on to the programs after this one at the hook (the services' reverse NAT
    /// after the tunnel egress program).
    #[inline(always)]
    fn next(reason: Counter) -> i32 {
        count(reason);
        TCX_NEXT
    }

    #[inline(always)]
    fn pass(reason: Counter) -> i32 {
        count(reason);
        TC_ACT_OK as i32
    }

    #[inline(always)]
    fn clamp(ctx: &TcContext, clamp: Clamp, counter: Counter) {
        match clamp {
            Clamp::Untouched => {}
            Clamp::BadOptions(reason) => count(reason),
            Clamp::Lower(rewrite) => apply(ctx, rewrite, counter),
        }
    }

    /// Applies a rewrite; counts it when it took.
    #[inline(always)]
    fn apply(ctx: &TcContext, rewrite: Rewrite, counter: Counter) {
        if rewritten(ctx, rewrite) {
            count(counter);
        }
    }

    /// Applies a rewrite; whether it took.
    #[inline(always)]
    fn rewritten(ctx: &TcContext, rewrite: Rewrite) -> bool {
        match rewrite {
            Rewrite::Mark(mark) => {
                ctx.set_mark(mark);
                true
            }
            Rewrite::Mss { at, check, old, new } => {
                // A 16-bit value at an odd distance from the header start straddles two of
                // the checksum's words: its bytes count swapped.
                let odd = (at - check) % 2 == 1;
                let (from, to) = if odd { (old.swap_bytes(), new.swap_bytes()) } else { (old, new) };
                // The helper keeps the checksum right with offload (CHECKSUM_PARTIAL) too.
                ctx.store(at, &new, 0).is_ok()
                    && ctx.l4_csum_replace(check, u64::from(from), u64::from(to), 2).is_ok()
            }
            Rewrite::Nat(nat) => nat::translate(ctx, &nat),
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
