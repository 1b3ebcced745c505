//! Connectivity probes run from inside a netns: TCP and UDP echo, ICMP echo.

use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns::Netns;

/// TCP and UDP echo servers on one port of a netns (all addresses, both
/// families), stopped on drop.
pub struct EchoServer {
    port: u16,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    /// Starts echo servers in `ns` on an ephemeral port.
    pub fn start(ns: &Netns) -> io::Result<EchoServer> {
        EchoServer::start_on(ns, 0)
    }

    /// Starts echo servers in `ns` on `port` (0: an ephemeral one).
    pub fn start_on(ns: &Netns, port: u16) -> io::Result<EchoServer> {
        let any = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        let (tcp, udp) = ns.run(|| -> io::Result<(TcpListener, UdpSocket)> {
            let tcp = TcpListener::bind(any)?;
            let port = tcp.local_addr()?.port();
            let udp = UdpSocket::bind(SocketAddr::new(any.ip(), port))?;
            Ok((tcp, udp))
        })??;
        let port = tcp.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        let s1 = Arc::clone(&stop);
        let t1 = std::thread::spawn(move || {
            while !s1.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 512];
                        if let Ok(n) = conn.read(&mut buf) {
                            let _ = conn.write_all(&buf[..n]);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let s2 = Arc::clone(&stop);
        let t2 = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            }
        });
        Ok(EchoServer {
            port,
            stop,
            threads: vec![t1, t2],
        })
    }

    /// The port both servers listen on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn payload(tag: &str) -> Vec<u8> {
    format!("plexus-probe {tag} {:?}", Instant::now()).into_bytes()
}

fn check_echo(sent: &[u8], got: &[u8], target: SocketAddr) -> io::Result<()> {
    if sent == got {
        Ok(())
    } else {
        Err(io::Error::other(format!("{target}: echo differs")))
    }
}

/// ICMP echo, then TCP and UDP echo to `port` on `ip`, from `from`; the first
/// that fails is named in the error.
pub fn reach(from: &Netns, ip: IpAddr, port: u16, timeout: Duration) -> Result<(), String> {
    let target = SocketAddr::new(ip, port);
    ping(from, ip, timeout).map_err(|e| format!("ping {ip}: {e}"))?;
    tcp(from, target, timeout).map_err(|e| format!("tcp {target}: {e}"))?;
    udp(from, target, timeout).map_err(|e| format!("udp {target}: {e}"))
}

/// Connects from `ns` to `target`, sends a payload and expects it back.
pub fn tcp(ns: &Netns, target: SocketAddr, timeout: Duration) -> io::Result<()> {
    ns.run(|| -> io::Result<()> {
        let mut s = TcpStream::connect_timeout(&target, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let msg = payload("tcp");
        s.write_all(&msg)?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got)?;
        check_echo(&msg, &got, target)
    })?
}

/// Sends a datagram from `ns` to `target` and expects it back (three tries).
pub fn udp(ns: &Netns, target: SocketAddr, timeout: Duration) -> io::Result<()> {
    ns.run(|| -> io::Result<()> {
        let any: SocketAddr = match target {
            SocketAddr::V4(_) => "0.0.0.0:0".parse().map_err(io::Error::other)?,
            SocketAddr::V6(_) => "[::]:0".parse().map_err(io::Error::other)?,
        };
        let s = UdpSocket::bind(any)?;
        s.set_read_timeout(Some(timeout / 3))?;
        let msg = payload("udp");
        let mut buf = [0u8; 512];
        let mut last = io::Error::other(format!("{target}: no UDP echo"));
        for _ in 0..3 {
            s.send_to(&msg, target)?;
            match s.recv_from(&mut buf) {
                Ok((n, _)) => return check_echo(&msg, &buf[..n], target),
                Err(e) => last = e,
            }
        }
        Err(last)
    })?
}

static PING_ID: AtomicU16 = AtomicU16::new(1);

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// ICMP echo from `ns` to `target`; returns the round-trip time.
pub fn ping(ns: &Netns, target: IpAddr, timeout: Duration) -> io::Result<Duration> {
    ns.run(|| -> io::Result<Duration> {
        let (domain, proto, request, reply) = match target {
            IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
            IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128u8, 129u8),
        };
        let sock = Socket::new(domain, Type::RAW, Some(proto))?;
        let id = PING_ID.fetch_add(1, Ordering::Relaxed) ^ (std::process::id() as u16);
        let mut pkt = vec![request, 0, 0, 0];
        pkt.extend_from_slice(&id.to_be_bytes());
        pkt.extend_from_slice(&1u16.to_be_bytes());
        pkt.extend_from_slice(b"plexus-ping-0123");
        if target.is_ipv4() {
            // The kernel fills in the ICMPv6 checksum, not the ICMPv4 one.
            let sum = checksum(&pkt);
            pkt[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        let start = Instant::now();
        sock.send_to(&pkt, &SockAddr::from(SocketAddr::new(target, 0)))?;
        let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no ICMP echo reply from {target}"),
                ));
            }
            sock.set_read_timeout(Some(left))?;
            let (n, _) = match sock.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            // SAFETY: recv_from initialised the first n bytes.
            let data: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            let icmp = if target.is_ipv4() {
                let ihl = usize::from(data.first().copied().unwrap_or(0) & 0x0f) * 4;
                data.get(ihl..).unwrap_or(&[])
            } else {
                &data[..]
            };
            if icmp.len() >= 8 && icmp[0] == reply && icmp[4..6] == id.to_be_bytes() {
                return Ok(start.elapsed());
            }
        }
    })?
}
