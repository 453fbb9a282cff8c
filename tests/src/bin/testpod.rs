//! `kproxy-testpod`: the workload of the namespace tests.
//!
//! `serve --name NAME [--tcp PORT]... [--udp PORT]...` answers every TCP line
//! and every UDP datagram with `NAME CLIENT_IP:CLIENT_PORT LOCAL_PORT`, so a
//! test sees which pod answered, on which port, and which client address
//! that pod saw. `--udp-echo PORT` sends every datagram back as it came;
//! `--dns PORT` answers DNS queries for an A record of any name with
//! 10.96.0.53 (the answer names the question, as a resolver checks);
//! `--tcp-close-first PORT` answers the first line and closes at once, as
//! an HTTP/1.0 server does (TIME_WAIT stays on the server). It prints
//! `ready` once every socket is bound.
//!
//! `client --target IP:PORT [--udp [--unconnected]] [--count N] [--timeout-ms T]
//! [--interval-ms I] [--hold] [--size N] [--download N] [--until-eof]` prints one JSON line per attempt:
//! `{"i":0,"t":1763900000000.0,"ok":true,"reply":"pod-a 10.244.1.30:40000 8080","peer":"10.96.0.10:80","ms":0.4}`
//! or `{"i":1,"t":...,"ok":false,"error":"refused","ms":0.1}` (`t`: start of
//! the attempt, ms since the Unix epoch; `peer`: the address the socket
//! says it talks to, from `getpeername`, or for `--unconnected` UDP
//! (`sendto`/`recvfrom`) the source of the answer). An IPv6 target
//! (`[::ffff:10.96.0.10]:80`) makes an AF_INET6 socket, as Java does for an
//! IPv4 address. With `--hold` all attempts go over one TCP connection (a
//! long-lived client). Loops are bounded by `--count` and stop by themselves.
//! `--size N` sends N-byte UDP datagrams (larger than the MTU: fragments);
//! `--download N` asks a TCP server for N bytes (`download N`), which it
//! sends and then closes. `--until-eof` reads after the answer until the
//! server closes, as an HTTP/1.0 client does, so a `--tcp-close-first`
//! server always closes first.
//!
//! `flood --target IP:PORT --count N [--max-ms T]` sends N TCP SYNs from
//! random sources in 198.18.0.0/15 (the benchmarking range) through a raw
//! socket, and stops after N packets or T ms, whichever comes first.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("client") => client(&args[1..]),
        Some("flood") => flood(&args[1..]),
        _ => Err("usage: kproxy-testpod serve|client ...".to_string()),
    };
    if let Err(err) = result {
        eprintln!("kproxy-testpod: {err}");
        std::process::exit(2);
    }
}

fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

fn value<T: std::str::FromStr>(args: &[String], flag: &str, default: T) -> Result<T, String> {
    match values(args, flag).last() {
        Some(v) => v.parse().map_err(|_| format!("bad value for {flag}: {v}")),
        None => Ok(default),
    }
}

fn serve(args: &[String]) -> Result<(), String> {
    let name: String = value(args, "--name", "pod".to_string())?;
    let mut threads = Vec::new();
    let tcp = values(args, "--tcp").into_iter().map(|p| (p, false));
    let close_first = values(args, "--tcp-close-first")
        .into_iter()
        .map(|p| (p, true));
    for (port, close_first) in tcp.chain(close_first) {
        let listener = TcpListener::bind(format!("0.0.0.0:{port}"))
            .map_err(|e| format!("bind tcp {port}: {e}"))?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || answer_tcp(conn, &name, close_first));
            }
        }));
    }
    for port in values(args, "--udp") {
        let socket = UdpSocket::bind(format!("0.0.0.0:{port}"))
            .map_err(|e| format!("bind udp {port}: {e}"))?;
        let name = name.clone();
        let port = port.to_string();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(format!("{name} {peer} {port}").as_bytes(), peer);
            }
        }));
    }
    for port in values(args, "--udp-echo") {
        let socket = UdpSocket::bind(format!("0.0.0.0:{port}"))
            .map_err(|e| format!("bind udp {port}: {e}"))?;
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], peer);
            }
        }));
    }
    for port in values(args, "--dns") {
        let socket = UdpSocket::bind(format!("0.0.0.0:{port}"))
            .map_err(|e| format!("bind udp {port}: {e}"))?;
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = socket.recv_from(&mut buf) {
                if let Some(answer) = dns_answer(&buf[..n], [10, 96, 0, 53]) {
                    let _ = socket.send_to(&answer, peer);
                }
            }
        }));
    }
    println!("ready");
    std::io::stdout().flush().ok();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// A DNS response to a one-question query: the question, and one A record
/// `ip` for it (TTL 30). None for what is not such a query.
fn dns_answer(query: &[u8], ip: [u8; 4]) -> Option<Vec<u8>> {
    // Header: id, flags, qdcount 1; then the question (labels, type, class).
    if query.len() < 12 || query[4..6] != [0, 1] {
        return None;
    }
    let mut i = 12;
    while *query.get(i)? != 0 {
        i += 1 + query[i] as usize;
    }
    let question_end = i + 5;
    let question = query.get(12..question_end)?;
    let mut out = Vec::with_capacity(question_end + 16);
    out.extend_from_slice(&query[..2]); // id
    out.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]); // response, RD RA; 1 question, 1 answer
    out.extend_from_slice(question);
    out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]); // name pointer, A, IN, TTL, len
    out.extend_from_slice(&ip);
    Some(out)
}

fn answer_tcp(conn: TcpStream, name: &str, close_first: bool) {
    let (Ok(peer), Ok(local)) = (conn.peer_addr(), conn.local_addr()) else {
        return;
    };
    let port = local.port();
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if let Some(n) = line.strip_prefix("download ") {
            let n: usize = n.trim().parse().unwrap_or(0);
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len());
                if writer.write_all(&chunk[..k]).is_err() {
                    return;
                }
                left -= k;
            }
            return;
        }
        if writeln!(writer, "{name} {peer} {port}").is_err() || close_first {
            return;
        }
    }
}

fn classify(err: &std::io::Error) -> String {
    match err.kind() {
        ErrorKind::ConnectionRefused => "refused".into(),
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout".into(),
        ErrorKind::ConnectionReset => "reset".into(),
        ErrorKind::UnexpectedEof => "closed".into(),
        _ => match err.raw_os_error() {
            // EHOSTUNREACH, ENETUNREACH
            Some(113) | Some(101) => "unreachable".into(),
            _ => format!("other: {err}"),
        },
    }
}

fn client(args: &[String]) -> Result<(), String> {
    let target: SocketAddr = values(args, "--target")
        .last()
        .ok_or("--target IP:PORT is required")?
        .parse()
        .map_err(|e| format!("--target: {e}"))?;
    let count: usize = value(args, "--count", 1)?;
    let timeout = Duration::from_millis(value(args, "--timeout-ms", 1000)?);
    let interval = Duration::from_millis(value(args, "--interval-ms", 0)?);
    let udp = args.iter().any(|a| a == "--udp");
    let unconnected = args.iter().any(|a| a == "--unconnected");
    let hold = args.iter().any(|a| a == "--hold");
    let size: usize = value(args, "--size", 0)?;
    let download: usize = value(args, "--download", 0)?;
    let until_eof = args.iter().any(|a| a == "--until-eof");
    let mut held: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let out = std::io::stdout();
    for i in 0..count {
        let start = Instant::now();
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0);
        let result = if udp && size > 0 {
            udp_sized_attempt(target, timeout, size)
        } else if udp {
            udp_attempt(target, timeout, unconnected)
        } else if download > 0 {
            download_attempt(target, timeout, download)
        } else if hold {
            held_attempt(&mut held, target, timeout)
        } else {
            tcp_attempt(target, timeout, until_eof)
        };
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let line = match result {
            Ok((reply, peer)) => {
                serde_json::json!({"i": i, "t": t, "ok": true, "reply": reply, "peer": peer.to_string(), "ms": ms})
            }
            Err(err) => serde_json::json!({"i": i, "t": t, "ok": false, "error": err, "ms": ms}),
        };
        let mut out = out.lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
        if !interval.is_zero() {
            std::thread::sleep(interval);
        }
    }
    Ok(())
}

/// An answer and the peer address the socket reported.
type Answer = Result<(String, SocketAddr), String>;

fn tcp_attempt(target: SocketAddr, timeout: Duration, until_eof: bool) -> Answer {
    let conn = TcpStream::connect_timeout(&target, timeout).map_err(|e| classify(&e))?;
    let mut reader = BufReader::new(conn.try_clone().map_err(|e| classify(&e))?);
    let answer = exchange(&conn, &mut reader, timeout)?;
    if until_eof {
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).map_err(|e| classify(&e))?;
    }
    Ok(answer)
}

fn held_attempt(
    held: &mut Option<(TcpStream, BufReader<TcpStream>)>,
    target: SocketAddr,
    timeout: Duration,
) -> Answer {
    if held.is_none() {
        let conn = TcpStream::connect_timeout(&target, timeout).map_err(|e| classify(&e))?;
        let reader = BufReader::new(conn.try_clone().map_err(|e| classify(&e))?);
        *held = Some((conn, reader));
    }
    let (conn, reader) = held.as_mut().expect("connected above");
    let result = exchange(conn, reader, timeout);
    if result.is_err() {
        // A broken held connection stays broken: report every later attempt.
        *held = None;
    }
    result
}

fn exchange(conn: &TcpStream, reader: &mut BufReader<TcpStream>, timeout: Duration) -> Answer {
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| classify(&e))?;
    (&*conn).write_all(b"hello\n").map_err(|e| classify(&e))?;
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Err("closed".into()),
        Ok(_) => Ok((
            line.trim_end().to_string(),
            conn.peer_addr().map_err(|e| classify(&e))?,
        )),
        Err(e) => Err(classify(&e)),
    }
}

/// Connected: connect, send, recv. Unconnected: sendto, recvfrom (each
/// datagram names its destination; the answer names its source).
fn udp_attempt(target: SocketAddr, timeout: Duration, unconnected: bool) -> Answer {
    let any = if target.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let socket = UdpSocket::bind(any).map_err(|e| classify(&e))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| classify(&e))?;
    let mut buf = [0u8; 1500];
    let (n, peer) = if unconnected {
        socket.send_to(b"hello", target).map_err(|e| classify(&e))?;
        socket.recv_from(&mut buf).map_err(|e| classify(&e))?
    } else {
        socket.connect(target).map_err(|e| classify(&e))?;
        socket.send(b"hello").map_err(|e| classify(&e))?;
        let n = socket.recv(&mut buf).map_err(|e| classify(&e))?;
        (n, socket.peer_addr().map_err(|e| classify(&e))?)
    };
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), peer))
}

/// A datagram of `size` bytes to an echo server; the reply must be as long.
fn udp_sized_attempt(target: SocketAddr, timeout: Duration, size: usize) -> Answer {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| classify(&e))?;
    socket.connect(target).map_err(|e| classify(&e))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| classify(&e))?;
    let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    socket.send(&payload).map_err(|e| classify(&e))?;
    let mut buf = vec![0u8; 65536];
    let n = socket.recv(&mut buf).map_err(|e| classify(&e))?;
    if buf[..n] != payload[..] {
        return Err(format!("short or changed echo: {n} of {size} bytes"));
    }
    Ok((
        format!("echo {n} bytes"),
        socket.peer_addr().map_err(|e| classify(&e))?,
    ))
}

/// Downloads `n` bytes; the reply names how many arrived.
fn download_attempt(target: SocketAddr, timeout: Duration, n: usize) -> Answer {
    let mut conn = TcpStream::connect_timeout(&target, timeout).map_err(|e| classify(&e))?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| classify(&e))?;
    writeln!(conn, "download {n}").map_err(|e| classify(&e))?;
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) => return Err(format!("{} after {got} bytes", classify(&e))),
        }
    }
    if got != n {
        return Err(format!("got {got} of {n} bytes"));
    }
    Ok((
        format!("downloaded {got} bytes"),
        conn.peer_addr().map_err(|e| classify(&e))?,
    ))
}

/// One's-complement sum of 16-bit words.
fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// SYNs from random sources, bounded by count and time.
fn flood(args: &[String]) -> Result<(), String> {
    let target: std::net::SocketAddrV4 = values(args, "--target")
        .last()
        .ok_or("--target IP:PORT is required")?
        .parse()
        .map_err(|e| format!("--target: {e}"))?;
    let count: usize = value(args, "--count", 1000)?;
    let max = Duration::from_millis(value(args, "--max-ms", 10_000)?);
    // SAFETY: plain socket calls; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(format!("raw socket: {}", std::io::Error::last_os_error()));
    }
    let dst = target.ip().octets();
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst),
        },
        sin_zero: [0; 8],
    };
    let started = Instant::now();
    let mut seed: u64 = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut sent = 0usize;
    while sent < count && started.elapsed() < max {
        // xorshift: cheap and good enough for spoofed sources and ports.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let r = seed;
        let src = [
            198,
            18 | ((r >> 8) as u8 & 1),
            (r >> 16) as u8,
            (r >> 24) as u8 | 1,
        ];
        let sport = 1024 + ((r >> 32) as u16 % 60000);
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&target.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&((r >> 16) as u32).to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x02; // SYN
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        let mut sum = csum_add(0, &src);
        sum = csum_add(sum, &dst);
        sum += 6 + 20;
        sum = csum_add(sum, &tcp);
        tcp[16..18].copy_from_slice(&csum_fold(sum).to_be_bytes());
        let mut pkt = [0u8; 40];
        pkt[0] = 0x45;
        pkt[2..4].copy_from_slice(&40u16.to_be_bytes());
        pkt[8] = 64;
        pkt[9] = 6;
        pkt[12..16].copy_from_slice(&src);
        pkt[16..20].copy_from_slice(&dst);
        let ip_sum = csum_fold(csum_add(0, &pkt[..20]));
        pkt[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        pkt[20..].copy_from_slice(&tcp);
        // SAFETY: sending a stack buffer to a sockaddr_in.
        let rc = unsafe {
            libc::sendto(
                fd,
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                0,
                &addr as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOBUFS) {
                // SAFETY: closing our fd.
                unsafe { libc::close(fd) };
                return Err(format!("sendto: {e}"));
            }
        }
        sent += 1;
    }
    // SAFETY: closing our fd.
    unsafe { libc::close(fd) };
    println!(
        "{{\"sent\":{sent},\"ms\":{}}}",
        started.elapsed().as_millis()
    );
    Ok(())
}
