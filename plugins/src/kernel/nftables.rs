//! nf_tables over netlink (`NETLINK_NETFILTER`): the messages a pod's
//! security groups are made of, sent as one batch that the kernel applies
//! whole or not at all. No `nft` process on ADD's path: building and
//! sending a table of some fifty rules costs a fraction of a millisecond.
//!
//! Only what a stateful filter per interface needs is here: one table of
//! family `inet`, base and regular chains, sets of addresses and their
//! elements, and rules of `meta`, `ct`, `payload`, `bitwise`, `cmp`,
//! `lookup` and a verdict. Every expression loads into and reads from
//! register 1. The numbers are those of `linux/netfilter/nf_tables.h` and
//! `nfnetlink.h`; the set key types are nft's, so `nft list` shows what
//! was written here.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

/// The family of every table written here: `inet`, both IP versions.
const NFPROTO_INET: u8 = 1;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

/// `NFTA_LIST_ELEM`, `NFTA_DATA_VALUE`: one item of a list, one datum.
const LIST_ELEM: u16 = 1;
const DATA_VALUE: u16 = 1;
/// The register every expression uses (`NFT_REG_1`, 16 bytes).
const REG: u32 = 1;

/// Where a base chain hooks in (`NF_INET_LOCAL_IN`, `NF_INET_LOCAL_OUT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Input = 1,
    Output = 3,
}

/// What a rule does when all its expressions match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Jump(String),
}

/// `nft_cmp_ops`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq = 0,
    Neq = 1,
}

/// Where a payload is read (`nft_payload_bases`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base {
    Network = 1,
    Transport = 2,
}

/// Keys of the `meta` expression used here (`nft_meta_keys`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaKey {
    IifName = 6,
    OifName = 7,
    NfProto = 15,
    L4Proto = 16,
}

/// One expression of a rule; loads go to register 1, the rest read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Meta(MetaKey),
    /// The connection's state bits (`NFT_CT_STATE`).
    CtState,
    Payload {
        base: Base,
        offset: u32,
        len: u32,
    },
    /// Register 1 &= mask (its length is the register's).
    And(Vec<u8>),
    Cmp(Op, Vec<u8>),
    /// Register 1 is within `from..=to` (compared as big-endian bytes).
    Range(Vec<u8>, Vec<u8>),
    /// Register 1 is an element of the named set.
    Lookup(String),
    Verdict(Verdict),
}

/// A transaction for one table: messages between a batch's begin and end.
pub struct Batch {
    table: String,
    buf: Vec<u8>,
    seq: u32,
    /// What each message does, by sequence number, for error messages.
    what: Vec<(u32, String)>,
    sets: u32,
    /// Where the last message starts.
    last: Option<usize>,
}

/// Appends netlink attributes to a message.
struct Attrs<'a>(&'a mut Vec<u8>);

impl Attrs<'_> {
    fn raw(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        self.0.resize(self.0.len().next_multiple_of(4), 0);
    }

    fn str(&mut self, kind: u16, s: &str) {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.raw(kind, &data);
    }

    fn be32(&mut self, kind: u16, v: u32) {
        self.raw(kind, &v.to_be_bytes());
    }

    fn nest(&mut self, kind: u16, f: impl FnOnce(&mut Attrs<'_>)) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        f(&mut Attrs(self.0));
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// A datum (`NFTA_DATA_VALUE` inside `kind`).
    fn data(&mut self, kind: u16, value: &[u8]) {
        self.nest(kind, |a| a.raw(DATA_VALUE, value));
    }

    fn expr(&mut self, e: &Expr) {
        // NFTA_EXPR_NAME, NFTA_EXPR_DATA
        self.nest(LIST_ELEM, |a| {
            a.str(1, e.name());
            a.nest(2, |a| e.write(a));
        });
    }
}

impl Expr {
    fn name(&self) -> &'static str {
        match self {
            Expr::Meta(_) => "meta",
            Expr::CtState => "ct",
            Expr::Payload { .. } => "payload",
            Expr::And(_) => "bitwise",
            Expr::Cmp(..) => "cmp",
            Expr::Range(..) => "range",
            Expr::Lookup(_) => "lookup",
            Expr::Verdict(_) => "immediate",
        }
    }

    /// The expression's attributes.
    fn write(&self, a: &mut Attrs<'_>) {
        match self {
            // NFTA_META_DREG, NFTA_META_KEY
            Expr::Meta(key) => {
                a.be32(1, REG);
                a.be32(2, *key as u32);
            }
            // NFTA_CT_DREG, NFTA_CT_KEY (NFT_CT_STATE)
            Expr::CtState => {
                a.be32(1, REG);
                a.be32(2, 0);
            }
            // NFTA_PAYLOAD_DREG, _BASE, _OFFSET, _LEN
            Expr::Payload { base, offset, len } => {
                a.be32(1, REG);
                a.be32(2, *base as u32);
                a.be32(3, *offset);
                a.be32(4, *len);
            }
            // NFTA_BITWISE_SREG, _DREG, _LEN, _MASK, _XOR
            Expr::And(mask) => {
                a.be32(1, REG);
                a.be32(2, REG);
                a.be32(3, mask.len() as u32);
                a.data(4, mask);
                a.data(5, &vec![0; mask.len()]);
            }
            // NFTA_CMP_SREG, _OP, _DATA
            Expr::Cmp(op, value) => {
                a.be32(1, REG);
                a.be32(2, *op as u32);
                a.data(3, value);
            }
            // NFTA_RANGE_SREG, _OP (NFT_RANGE_EQ), _FROM_DATA, _TO_DATA
            Expr::Range(from, to) => {
                a.be32(1, REG);
                a.be32(2, 0);
                a.data(3, from);
                a.data(4, to);
            }
            // NFTA_LOOKUP_SET, _SREG
            Expr::Lookup(set) => {
                a.str(1, set);
                a.be32(2, REG);
            }
            // NFTA_IMMEDIATE_DREG (the verdict register), _DATA:
            // NFTA_DATA_VERDICT { NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN }
            Expr::Verdict(v) => {
                a.be32(1, 0);
                let (code, chain) = match v {
                    Verdict::Drop => (0u32, None),
                    Verdict::Accept => (1, None),
                    // NFT_JUMP, -3
                    Verdict::Jump(c) => ((-3i32) as u32, Some(c)),
                };
                a.nest(2, |a| {
                    a.nest(2, |a| {
                        a.be32(1, code);
                        if let Some(c) = chain {
                            a.str(2, c);
                        }
                    })
                });
            }
        }
    }
}

fn addr_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

impl Batch {
    pub fn new(table: &str) -> Batch {
        let mut b = Batch {
            table: table.to_string(),
            buf: Vec::with_capacity(8192),
            seq: 0,
            what: Vec::new(),
            sets: 0,
            last: None,
        };
        b.header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        b
    }

    /// Starts a message: nlmsghdr (its length set by `finish`), nfgenmsg.
    fn header(&mut self, kind: u16, flags: u16, family: u8, res_id: u16) -> usize {
        let start = self.buf.len();
        self.seq += 1;
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&[family, 0]);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        self.finish(start);
        start
    }

    fn finish(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// One nf_tables message about this batch's table.
    fn message(&mut self, kind: u16, flags: u16, what: String, f: impl FnOnce(&mut Attrs<'_>)) {
        let start = self.header(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST | flags,
            NFPROTO_INET,
            0,
        );
        self.what.push((self.seq, what));
        self.last = Some(start);
        f(&mut Attrs(&mut self.buf));
        self.finish(start);
    }

    /// The table; one that is there stays as it is.
    pub fn add_table(&mut self) {
        let name = self.table.clone();
        self.message(
            NFT_MSG_NEWTABLE,
            NLM_F_CREATE,
            format!("add table {name}"),
            |a| a.str(1, &name),
        );
    }

    /// The table and everything in it.
    pub fn delete_table(&mut self) {
        let name = self.table.clone();
        self.message(NFT_MSG_DELTABLE, 0, format!("delete table {name}"), |a| {
            a.str(1, &name)
        });
    }

    /// Every rule of every chain of the table (`nft flush table`).
    pub fn flush_table(&mut self) {
        let name = self.table.clone();
        self.message(NFT_MSG_DELRULE, 0, format!("flush table {name}"), |a| {
            a.str(1, &name)
        });
    }

    /// A chain; a base chain (`hook`) of type filter, priority 0, policy
    /// accept. One that is there stays.
    pub fn add_chain(&mut self, name: &str, hook: Option<Hook>) {
        let table = self.table.clone();
        self.message(
            NFT_MSG_NEWCHAIN,
            NLM_F_CREATE,
            format!("add chain {name}"),
            |a| {
                a.str(1, &table);
                a.str(3, name);
                if let Some(hook) = hook {
                    // NFTA_CHAIN_HOOK { NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY }
                    a.nest(4, |a| {
                        a.be32(1, hook as u32);
                        a.be32(2, 0);
                    });
                    // NFTA_CHAIN_POLICY (NF_ACCEPT), NFTA_CHAIN_TYPE
                    a.be32(5, 1);
                    a.str(7, "filter");
                }
            },
        );
    }

    /// A set of IPv4 or IPv6 addresses. One that is there stays.
    pub fn add_set(&mut self, name: &str, v6: bool) {
        let table = self.table.clone();
        self.sets += 1;
        let id = self.sets;
        self.message(
            NFT_MSG_NEWSET,
            NLM_F_CREATE,
            format!("add set {name}"),
            |a| {
                a.str(1, &table);
                a.str(2, name);
                // NFTA_SET_KEY_TYPE: nft's ipv4_addr (7), ipv6_addr (8).
                a.be32(4, if v6 { 8 } else { 7 });
                a.be32(5, if v6 { 16 } else { 4 });
                // NFTA_SET_ID, which the kernel asks of a new set.
                a.be32(10, id);
            },
        );
    }

    /// Every element of a set.
    pub fn flush_set(&mut self, name: &str) {
        let table = self.table.clone();
        self.message(NFT_MSG_DELSETELEM, 0, format!("flush set {name}"), |a| {
            a.str(1, &table);
            a.str(2, name);
        });
    }

    /// Adds (or, with `add` false, deletes) addresses of a set.
    pub fn elements(&mut self, set: &str, add: bool, addresses: &[IpAddr]) {
        if addresses.is_empty() {
            return;
        }
        let table = self.table.clone();
        let (kind, flags, verb) = if add {
            (NFT_MSG_NEWSETELEM, NLM_F_CREATE, "add")
        } else {
            (NFT_MSG_DELSETELEM, 0, "delete")
        };
        let what = format!("{verb} {} element(s) of set {set}", addresses.len());
        self.message(kind, flags, what, |a| {
            a.str(1, &table);
            a.str(2, set);
            a.nest(3, |a| {
                for addr in addresses {
                    // NFTA_SET_ELEM_KEY
                    a.nest(LIST_ELEM, |a| a.data(1, &addr_bytes(addr)));
                }
            });
        });
    }

    /// Appends a rule to a chain.
    pub fn add_rule(&mut self, chain: &str, exprs: &[Expr]) {
        let table = self.table.clone();
        let what = format!("add rule to chain {chain}");
        self.message(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, what, |a| {
            a.str(1, &table);
            a.str(2, chain);
            a.nest(4, |a| exprs.iter().for_each(|e| a.expr(e)));
        });
    }

    /// Sends the batch on a socket of this thread's netns and waits for the
    /// kernel's answer to each message. Errors name the message refused.
    pub fn send(mut self) -> Result<(), Failure> {
        if self.what.is_empty() {
            return Ok(());
        }
        // Only the last message asks for an ack: the kernel reports every
        // refused message anyway, before that ack.
        if let Some(start) = self.last {
            let flags = u16::from_ne_bytes([self.buf[start + 6], self.buf[start + 7]]) | NLM_F_ACK;
            self.buf[start + 6..start + 8].copy_from_slice(&flags.to_ne_bytes());
        }
        self.header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|e| fail("netlink socket", e))?;
        self.exchange(&fd)
    }

    fn exchange(&self, fd: &OwnedFd) -> Result<(), Failure> {
        let raw = fd.as_raw_fd();
        bind(raw, &NetlinkAddr::new(0, 0)).map_err(|e| fail("netlink bind", e))?;
        // A kernel that does not answer must not hang the CNI call.
        setsockopt(fd, sockopt::ReceiveTimeout, &TimeVal::new(5, 0))
            .map_err(|e| fail("netlink socket timeout", e))?;
        let sent = send(raw, &self.buf, MsgFlags::empty()).map_err(|e| fail("netlink send", e))?;
        if sent != self.buf.len() {
            return Err(fail("netlink send (short)", nix::Error::EMSGSIZE));
        }
        // Answered once the last message's ack (or the batch's refusal) came.
        let last = self.what.last().map_or(0, |(s, _)| *s);
        let mut answered = false;
        let mut first_error: Option<Failure> = None;
        let mut buf = vec![0u8; 64 * 1024];
        while !answered {
            let n = recv(raw, &mut buf, MsgFlags::empty())
                .map_err(|e| fail("waiting for the kernel's answer", e))?;
            let mut at = 0;
            while at + 16 <= n {
                let word = |i: usize| {
                    u32::from_ne_bytes([
                        buf[at + i],
                        buf[at + i + 1],
                        buf[at + i + 2],
                        buf[at + i + 3],
                    ])
                };
                let len = word(0) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let seq = word(8);
                if len < 16 || at + len > n {
                    break;
                }
                if kind == NLMSG_ERROR && len >= 20 {
                    let code = word(16) as i32;
                    answered |= seq == last;
                    if code != 0 && first_error.is_none() {
                        let what = self
                            .what
                            .iter()
                            .find(|(s, _)| *s == seq)
                            .map_or("the batch", |(_, w)| w.as_str());
                        first_error = Some(fail(what, nix::Error::from_raw(-code)));
                        // The batch as a whole was refused: no more answers.
                        if !self.what.iter().any(|(s, _)| *s == seq) {
                            answered = true;
                        }
                    }
                }
                at += (len + 3) & !3;
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// A message the kernel refused, or a socket that failed.
#[derive(Debug)]
pub struct Failure {
    pub what: String,
    pub errno: nix::Error,
}

fn fail(what: &str, errno: nix::Error) -> Failure {
    Failure {
        what: what.to_string(),
        errno,
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.errno.desc())
    }
}

/// Runs `f` on a thread inside the netns at `netns` (a socket it opens
/// belongs there); the calling thread never leaves its own.
pub fn in_netns<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> Result<T, String> + Send,
) -> Result<T, String> {
    let file = std::fs::File::open(netns).map_err(|e| format!("{}: {e}", netns.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("enter {}: {e}", netns.display()))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err("netns thread panicked".to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_framed_and_nested_attributes_sized() {
        let mut b = Batch::new("t");
        b.add_rule(
            "c",
            &[Expr::Meta(MetaKey::L4Proto), Expr::Cmp(Op::Eq, vec![6])],
        );
        // begin (20) + rule; every message 4-aligned, lengths add up.
        let mut at = 0;
        let mut kinds = Vec::new();
        while at < b.buf.len() {
            let len = u32::from_ne_bytes(b.buf[at..at + 4].try_into().unwrap()) as usize;
            kinds.push(u16::from_ne_bytes([b.buf[at + 4], b.buf[at + 5]]));
            assert_eq!(len % 4, 0);
            at += len;
        }
        assert_eq!(at, b.buf.len());
        assert_eq!(kinds, [NFNL_MSG_BATCH_BEGIN, (10 << 8) | NFT_MSG_NEWRULE]);
        // The cmp's datum: a nested NFTA_CMP_DATA holding one byte, 6.
        let cmp = b.buf.windows(4).position(|w| w == b"cmp\0").unwrap();
        assert!(b.buf[cmp..].windows(5).any(|w| w == [5, 0, 1, 0, 6]));
    }
}
