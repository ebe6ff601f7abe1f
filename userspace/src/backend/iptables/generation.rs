//! The nf_tables ruleset generation: a counter the kernel bumps on every change to any
//! table of this network namespace (`NFT_MSG_GETGEN`). One netlink round trip, no exec: an
//! unchanged generation means no rule, chain or hook changed since it was last read, so the
//! repair loop of the nft variant re-reads its tables only when something did change.

use anyhow::{bail, Context, Result};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
/// `struct nlmsghdr` + `struct nfgenmsg`.
const HEADERS: usize = 16 + 4;

/// The current generation of this network namespace's nf_tables ruleset.
pub fn nft() -> Result<u32> {
    let mut socket = Socket::new(NETLINK_NETFILTER).context("netlink (netfilter) socket")?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut request = Vec::with_capacity(HEADERS);
    request.extend((HEADERS as u32).to_ne_bytes());
    request.extend(((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    request.extend(NLM_F_REQUEST.to_ne_bytes());
    request.extend(1u32.to_ne_bytes()); // sequence
    request.extend(0u32.to_ne_bytes()); // port id: the kernel's
    request.extend([libc::AF_UNSPEC as u8, 0, 0, 0]); // family, NFNETLINK_V0, resource id
    socket.send(&request, 0).context("asking for the nf_tables generation")?;
    let (answer, _) = socket.recv_from_full().context("reading the nf_tables generation")?;
    parse(&answer)
}

fn parse(answer: &[u8]) -> Result<u32> {
    if answer.len() < HEADERS {
        bail!("short nf_tables generation answer ({} bytes)", answer.len());
    }
    let kind = u16::from_ne_bytes([answer[4], answer[5]]);
    if kind == NLMSG_ERROR {
        let errno = i32::from_ne_bytes([answer[16], answer[17], answer[18], answer[19]]);
        bail!("nf_tables generation: {}", std::io::Error::from_raw_os_error(-errno));
    }
    let len = (u32::from_ne_bytes([answer[0], answer[1], answer[2], answer[3]]) as usize).min(answer.len());
    let mut at = HEADERS;
    while at + 4 <= len {
        let attr_len = u16::from_ne_bytes([answer[at], answer[at + 1]]) as usize;
        let attr_kind = u16::from_ne_bytes([answer[at + 2], answer[at + 3]]) & 0x3fff;
        if attr_len < 4 || at + attr_len > len {
            break;
        }
        if attr_kind == NFTA_GEN_ID && attr_len >= 8 {
            let id = &answer[at + 4..at + 8];
            return Ok(u32::from_be_bytes([id[0], id[1], id[2], id[3]]));
        }
        at += (attr_len + 3) & !3;
    }
    bail!("nf_tables generation answer without a generation id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generation_id_is_read_from_its_attribute() {
        let mut answer = Vec::new();
        answer.extend(36u32.to_ne_bytes());
        answer.extend(((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
        answer.extend([0u8; 10]);
        answer.extend([0u8; 4]);
        // A PID attribute first, then the id (big endian).
        answer.extend(8u16.to_ne_bytes());
        answer.extend(2u16.to_ne_bytes());
        answer.extend(77u32.to_be_bytes());
        answer.extend(8u16.to_ne_bytes());
        answer.extend(1u16.to_ne_bytes());
        answer.extend(4242u32.to_be_bytes());
        assert_eq!(parse(&answer).unwrap(), 4242);
        assert!(parse(&answer[..20]).is_err());
    }
}
