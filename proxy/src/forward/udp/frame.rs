//! The UDP relay protocol: datagrams framed on one TCP stream (a
//! port-forward to the relay). The client starts with [`MAGIC`] (or
//! [`MAGIC_ACK`], which the relay answers with the same bytes); then
//! frames `type (u8) | session (u32) | length (u16) | payload`, big endian.
//! A session is one client address: OPEN names its destination, DATA
//! carries one datagram each way, CLOSE ends it (either side), ERROR (relay
//! to client) says why a session failed. Frames of a session keep their
//! order (one stream). Pure: bytes in, frames out.

use std::net::{IpAddr, SocketAddr};

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const MAGIC: &[u8; 4] = b"KPU1";
/// The greeting that asks the relay to answer with the same four bytes
/// before anything else: a relay just started (an ephemeral container) is
/// known to listen once they arrive. A relay that predates it drops the
/// stream, so it is sent only to relays of the client's own version.
pub const MAGIC_ACK: &[u8; 4] = b"KPU2";
pub const HEADER_LEN: usize = 7;
/// The largest UDP payload (IPv4: 65535 - 20 - 8).
pub const MAX_DATAGRAM: usize = 65507;

const OPEN: u8 = 1;
const DATA: u8 = 2;
const CLOSE: u8 = 3;
const ERROR: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Open { session: u32, dest: SocketAddr },
    Data { session: u32, payload: Bytes },
    Close { session: u32 },
    Error { session: u32, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not the kproxy UDP relay protocol (bad greeting)")]
    Magic,
    #[error("unknown frame type {0}")]
    Type(u8),
    #[error("bad OPEN frame: {0}")]
    Open(String),
}

pub fn encode(frame: &Frame, out: &mut BytesMut) {
    let (kind, session) = match frame {
        Frame::Open { session, .. } => (OPEN, session),
        Frame::Data { session, .. } => (DATA, session),
        Frame::Close { session } => (CLOSE, session),
        Frame::Error { session, .. } => (ERROR, session),
    };
    out.put_u8(kind);
    out.put_u32(*session);
    match frame {
        Frame::Open { dest, .. } => match dest.ip() {
            IpAddr::V4(ip) => {
                out.put_u16(7);
                out.put_u8(4);
                out.put_slice(&ip.octets());
                out.put_u16(dest.port());
            }
            IpAddr::V6(ip) => {
                out.put_u16(19);
                out.put_u8(6);
                out.put_slice(&ip.octets());
                out.put_u16(dest.port());
            }
        },
        Frame::Data { payload, .. } => {
            let n = payload.len().min(u16::MAX as usize);
            out.put_u16(n as u16);
            out.put_slice(&payload[..n]);
        }
        Frame::Close { .. } => out.put_u16(0),
        Frame::Error { message, .. } => {
            let m = &message.as_bytes()[..message.len().min(1024)];
            out.put_u16(m.len() as u16);
            out.put_slice(m);
        }
    }
}

/// Takes the client's greeting from the front of `buf`: None while only
/// part of it is there, else whether it asks for an answer ([`MAGIC_ACK`]).
pub fn take_greeting(buf: &mut BytesMut) -> Result<Option<bool>, FrameError> {
    let n = buf.len().min(MAGIC.len());
    let ack = if buf[..n] == MAGIC[..n] {
        false
    } else if buf[..n] == MAGIC_ACK[..n] {
        true
    } else {
        return Err(FrameError::Magic);
    };
    if n < MAGIC.len() {
        return Ok(None);
    }
    buf.advance(MAGIC.len());
    Ok(Some(ack))
}

/// Takes one frame from the front of `buf`, if a whole one is there.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[5], buf[6]]) as usize;
    if buf.len() < HEADER_LEN + len {
        buf.reserve(HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    let kind = buf[0];
    let session = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(len).freeze();
    Ok(Some(match kind {
        OPEN => {
            let dest = match (payload.first(), payload.len()) {
                (Some(4), 7) => SocketAddr::new(
                    IpAddr::from([payload[1], payload[2], payload[3], payload[4]]),
                    u16::from_be_bytes([payload[5], payload[6]]),
                ),
                (Some(6), 19) => {
                    let mut ip = [0u8; 16];
                    ip.copy_from_slice(&payload[1..17]);
                    SocketAddr::new(
                        IpAddr::from(ip),
                        u16::from_be_bytes([payload[17], payload[18]]),
                    )
                }
                _ => {
                    return Err(FrameError::Open(format!(
                        "{} bytes of address",
                        payload.len()
                    )))
                }
            };
            Frame::Open { session, dest }
        }
        DATA => Frame::Data { session, payload },
        CLOSE => Frame::Close { session },
        ERROR => Frame::Error {
            session,
            message: String::from_utf8_lossy(&payload).into_owned(),
        },
        other => return Err(FrameError::Type(other)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip_in_order() {
        let frames = vec![
            Frame::Open {
                session: 1,
                dest: "10.244.2.10:53".parse().unwrap(),
            },
            Frame::Open {
                session: 2,
                dest: "[fd00::1]:5353".parse().unwrap(),
            },
            Frame::Data {
                session: 1,
                payload: Bytes::from(vec![7u8; MAX_DATAGRAM]),
            },
            Frame::Data {
                session: 2,
                payload: Bytes::new(),
            },
            Frame::Close { session: 1 },
            Frame::Error {
                session: 2,
                message: "destination outside --cluster-cidr".into(),
            },
        ];
        let mut buf = BytesMut::new();
        buf.put_slice(MAGIC);
        for f in &frames {
            encode(f, &mut buf);
        }
        // Byte by byte: nothing before a frame is whole.
        let mut feed = BytesMut::new();
        let mut got = Vec::new();
        let mut greeted = false;
        for b in buf.iter() {
            feed.put_u8(*b);
            if !greeted {
                greeted = take_greeting(&mut feed).unwrap().is_some();
                continue;
            }
            while let Some(f) = decode(&mut feed).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn wire_layout() {
        let mut buf = BytesMut::new();
        encode(
            &Frame::Open {
                session: 258,
                dest: "1.2.3.4:53".parse().unwrap(),
            },
            &mut buf,
        );
        assert_eq!(&buf[..], &[1, 0, 0, 1, 2, 0, 7, 4, 1, 2, 3, 4, 0, 53]);
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(
            take_greeting(&mut BytesMut::from(&b"GET / HTTP/1.1"[..])),
            Err(FrameError::Magic)
        );
        assert_eq!(take_greeting(&mut BytesMut::from(&b"KP"[..])), Ok(None));
        // The greeting that asks for an answer, whole and in part.
        let mut buf = BytesMut::from(&b"KPU2\x02"[..]);
        assert_eq!(take_greeting(&mut buf), Ok(Some(true)));
        assert_eq!(&buf[..], b"\x02");
        assert_eq!(take_greeting(&mut BytesMut::from(&b"KPU"[..])), Ok(None));
        assert_eq!(
            take_greeting(&mut BytesMut::from(&b"KPU1"[..])),
            Ok(Some(false))
        );
        assert_eq!(
            take_greeting(&mut BytesMut::from(&b"KPU3"[..])),
            Err(FrameError::Magic)
        );
        assert_eq!(
            decode(&mut BytesMut::from(&[9u8, 0, 0, 0, 1, 0, 0][..])),
            Err(FrameError::Type(9))
        );
        assert!(matches!(
            decode(&mut BytesMut::from(&[1u8, 0, 0, 0, 1, 0, 2, 4, 1][..])),
            Err(FrameError::Open(_))
        ));
    }
}
