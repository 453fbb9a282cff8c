//! SPDY/3.1 frames (the framing of kubectl's and the kubelet's port-forward
//! streams): encoding and decoding, with the header blocks compressed by
//! zlib with the SPDY dictionary, one compression context per direction of
//! a connection. Pure: bytes in, frames out.
//!
//! Control frame: `1 | version (15) | type (16) | flags (8) | length (24) |
//! data`; data frame: `0 | stream id (31) | flags (8) | length (24) | data`.
//! Header block: a u32 count of pairs, then each name and value as a u32
//! length and bytes (names lowercase), compressed as one zlib stream per
//! connection direction, flushed (sync flush) after every block.
//! Flow control (WINDOW_UPDATE) is decoded but neither sent nor obeyed:
//! Go's spdystream, on both ends of Kubernetes' streams, implements none.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

pub const VERSION: u16 = 3;
const CONTROL_BIT: u8 = 0x80;
pub const FLAG_FIN: u8 = 0x01;
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// Frame header size (both kinds).
pub const HEADER_LEN: usize = 8;
/// Largest frame length the format can say (24 bits).
pub const MAX_LENGTH: usize = (1 << 24) - 1;
/// A decompressed header block larger than this is refused (memory bound).
const MAX_HEADER_BLOCK: usize = 256 * 1024;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// RST_STREAM status codes.
pub const RST_PROTOCOL_ERROR: u32 = 1;
pub const RST_REFUSED_STREAM: u32 = 3;
pub const RST_CANCEL: u32 = 5;

/// Name/value pairs, names lowercase.
pub type Headers = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings(Vec<(u8, u32, u32)>),
    Ping(u32),
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Bytes,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("unsupported SPDY version {0} (expected 3)")]
    Version(u16),
    #[error("invalid {what} frame: {why}")]
    Invalid { what: &'static str, why: String },
    #[error("header block: {0}")]
    HeaderBlock(String),
}

fn invalid(what: &'static str, why: impl Into<String>) -> FrameError {
    FrameError::Invalid {
        what,
        why: why.into(),
    }
}

/// The 8-byte header of a data frame (its payload follows, written by the
/// caller without copying it into a frame buffer).
pub fn data_header(stream_id: u32, flags: u8, len: usize) -> [u8; HEADER_LEN] {
    debug_assert!(len <= MAX_LENGTH);
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
    h[4..].copy_from_slice(&(((flags as u32) << 24) | len as u32).to_be_bytes());
    h
}

/// Encodes frames; owns the sending direction's header compression context.
pub struct Encoder {
    zlib: Compress,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    pub fn new() -> Self {
        let mut zlib = Compress::new(Compression::default(), true);
        zlib.set_dictionary(&super::dictionary::dictionary())
            .expect("setting a dictionary on a fresh compressor cannot fail");
        Encoder { zlib }
    }

    fn header_block(&mut self, headers: &Headers, out: &mut BytesMut) {
        let mut plain = Vec::with_capacity(64);
        plain.put_u32(headers.len() as u32);
        for (k, v) in headers {
            plain.put_u32(k.len() as u32);
            plain.extend_from_slice(k.to_ascii_lowercase().as_bytes());
            plain.put_u32(v.len() as u32);
            plain.extend_from_slice(v.as_bytes());
        }
        let mut compressed = Vec::with_capacity(plain.len() + 64);
        let mut input = &plain[..];
        loop {
            if compressed.capacity() - compressed.len() < 64 {
                compressed.reserve(256);
            }
            let before = self.zlib.total_in();
            self.zlib
                .compress_vec(input, &mut compressed, FlushCompress::Sync)
                .expect("deflate with sync flush into a vector cannot fail");
            input = &input[(self.zlib.total_in() - before) as usize..];
            // Done once all input is taken and the flush had room to finish.
            if input.is_empty() && compressed.len() < compressed.capacity() {
                break;
            }
        }
        out.extend_from_slice(&compressed);
    }

    fn control(
        &mut self,
        kind: u16,
        flags: u8,
        out: &mut BytesMut,
        body: impl FnOnce(&mut Self, &mut BytesMut),
    ) {
        let start = out.len();
        out.put_u16(0x8000 | VERSION);
        out.put_u16(kind);
        out.put_u32(0); // flags and length, patched below
        body(self, out);
        let len = out.len() - start - HEADER_LEN;
        out[start + 4..start + 8]
            .copy_from_slice(&(((flags as u32) << 24) | len as u32).to_be_bytes());
    }

    /// Appends `frame` to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) {
        match frame {
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                headers,
            } => self.control(TYPE_SYN_STREAM, *flags, out, |e, out| {
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32(associated_to & 0x7fff_ffff);
                out.put_u8((priority & 0x7) << 5);
                out.put_u8(0); // credential slot
                e.header_block(headers, out);
            }),
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            } => self.control(TYPE_SYN_REPLY, *flags, out, |e, out| {
                out.put_u32(stream_id & 0x7fff_ffff);
                e.header_block(headers, out);
            }),
            Frame::Headers {
                stream_id,
                flags,
                headers,
            } => self.control(TYPE_HEADERS, *flags, out, |e, out| {
                out.put_u32(stream_id & 0x7fff_ffff);
                e.header_block(headers, out);
            }),
            Frame::RstStream { stream_id, status } => {
                self.control(TYPE_RST_STREAM, 0, out, |_, out| {
                    out.put_u32(stream_id & 0x7fff_ffff);
                    out.put_u32(*status);
                })
            }
            Frame::Settings(entries) => self.control(TYPE_SETTINGS, 0, out, |_, out| {
                out.put_u32(entries.len() as u32);
                for (flags, id, value) in entries {
                    out.put_u32(((*flags as u32) << 24) | (id & 0xff_ffff));
                    out.put_u32(*value);
                }
            }),
            Frame::Ping(id) => self.control(TYPE_PING, 0, out, |_, out| out.put_u32(*id)),
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => self.control(TYPE_GOAWAY, 0, out, |_, out| {
                out.put_u32(last_good_stream_id & 0x7fff_ffff);
                out.put_u32(*status);
            }),
            Frame::WindowUpdate { stream_id, delta } => {
                self.control(TYPE_WINDOW_UPDATE, 0, out, |_, out| {
                    out.put_u32(stream_id & 0x7fff_ffff);
                    out.put_u32(delta & 0x7fff_ffff);
                })
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                out.extend_from_slice(&data_header(*stream_id, *flags, data.len()));
                out.extend_from_slice(data);
            }
        }
    }
}

/// Decodes frames; owns the receiving direction's header decompression context.
pub struct Decoder {
    zlib: Decompress,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

/// How many more bytes the frame at the front of `buf` needs to be whole
/// (its header first).
pub fn missing(buf: &[u8]) -> usize {
    if buf.len() < HEADER_LEN {
        return HEADER_LEN - buf.len();
    }
    let len = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
    (HEADER_LEN + len).saturating_sub(buf.len())
}

impl Decoder {
    pub fn new() -> Self {
        Decoder {
            zlib: Decompress::new(true),
        }
    }

    fn header_block(
        &mut self,
        what: &'static str,
        mut input: &[u8],
    ) -> Result<Headers, FrameError> {
        let mut plain: Vec<u8> = Vec::with_capacity(input.len() * 4 + 64);
        loop {
            if plain.capacity() - plain.len() < 64 {
                plain.reserve(plain.capacity().max(256));
            }
            if plain.len() > MAX_HEADER_BLOCK {
                return Err(FrameError::HeaderBlock(format!(
                    "larger than {MAX_HEADER_BLOCK} bytes"
                )));
            }
            let before = self.zlib.total_in();
            let r = self
                .zlib
                .decompress_vec(input, &mut plain, FlushDecompress::Sync);
            input = &input[(self.zlib.total_in() - before) as usize..];
            match r {
                Ok(Status::StreamEnd) => {
                    return Err(FrameError::HeaderBlock(
                        "the compression stream ended (a peer never ends it)".into(),
                    ))
                }
                Ok(_) => {
                    if input.is_empty() && plain.len() < plain.capacity() {
                        break;
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.zlib
                        .set_dictionary(&super::dictionary::dictionary())
                        .map_err(|e| FrameError::HeaderBlock(format!("dictionary: {e}")))?;
                }
                Err(e) => return Err(FrameError::HeaderBlock(e.to_string())),
            }
        }
        parse_pairs(&plain).map_err(|why| invalid(what, why))
    }

    /// Takes one frame from the front of `buf`, if a whole one is there
    /// ([`missing`] says how much more is needed).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if missing(buf) > 0 {
            return Ok(None);
        }
        let flags = buf[4];
        let len = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
        if buf[0] & CONTROL_BIT == 0 {
            let stream_id = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            buf.advance(HEADER_LEN);
            let data = buf.split_to(len).freeze();
            return Ok(Some(Frame::Data {
                stream_id,
                flags,
                data,
            }));
        }
        let version = u16::from_be_bytes([buf[0] & 0x7f, buf[1]]);
        let kind = u16::from_be_bytes([buf[2], buf[3]]);
        buf.advance(HEADER_LEN);
        let body = buf.split_to(len);
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        let u32_at = |b: &[u8], i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let need = |what, n: usize| {
            if body.len() < n {
                Err(invalid(what, format!("{} bytes, need {n}", body.len())))
            } else {
                Ok(())
            }
        };
        let frame = match kind {
            TYPE_SYN_STREAM => {
                need("SYN_STREAM", 10)?;
                Frame::SynStream {
                    stream_id: u32_at(&body, 0) & 0x7fff_ffff,
                    associated_to: u32_at(&body, 4) & 0x7fff_ffff,
                    priority: body[8] >> 5,
                    flags,
                    headers: self.header_block("SYN_STREAM", &body[10..])?,
                }
            }
            TYPE_SYN_REPLY => {
                need("SYN_REPLY", 4)?;
                Frame::SynReply {
                    stream_id: u32_at(&body, 0) & 0x7fff_ffff,
                    flags,
                    headers: self.header_block("SYN_REPLY", &body[4..])?,
                }
            }
            TYPE_HEADERS => {
                need("HEADERS", 4)?;
                Frame::Headers {
                    stream_id: u32_at(&body, 0) & 0x7fff_ffff,
                    flags,
                    headers: self.header_block("HEADERS", &body[4..])?,
                }
            }
            TYPE_RST_STREAM => {
                need("RST_STREAM", 8)?;
                Frame::RstStream {
                    stream_id: u32_at(&body, 0) & 0x7fff_ffff,
                    status: u32_at(&body, 4),
                }
            }
            TYPE_SETTINGS => {
                need("SETTINGS", 4)?;
                let n = u32_at(&body, 0) as usize;
                if body.len() != 4 + 8 * n {
                    return Err(invalid(
                        "SETTINGS",
                        format!("{n} entries in {} bytes", body.len()),
                    ));
                }
                Frame::Settings(
                    (0..n)
                        .map(|i| {
                            let fid = u32_at(&body, 4 + 8 * i);
                            ((fid >> 24) as u8, fid & 0xff_ffff, u32_at(&body, 8 + 8 * i))
                        })
                        .collect(),
                )
            }
            TYPE_PING => {
                need("PING", 4)?;
                Frame::Ping(u32_at(&body, 0))
            }
            TYPE_GOAWAY => {
                need("GOAWAY", 4)?;
                Frame::GoAway {
                    last_good_stream_id: u32_at(&body, 0) & 0x7fff_ffff,
                    // SPDY/2 peers send no status.
                    status: if body.len() >= 8 { u32_at(&body, 4) } else { 0 },
                }
            }
            TYPE_WINDOW_UPDATE => {
                need("WINDOW_UPDATE", 8)?;
                Frame::WindowUpdate {
                    stream_id: u32_at(&body, 0) & 0x7fff_ffff,
                    delta: u32_at(&body, 4) & 0x7fff_ffff,
                }
            }
            // Unknown control frames are to be ignored (SPDY/3 §2.2.1):
            // report them as a no-op window update of stream 0.
            _ => Frame::WindowUpdate {
                stream_id: 0,
                delta: 0,
            },
        };
        Ok(Some(frame))
    }
}

fn parse_pairs(mut b: &[u8]) -> Result<Headers, String> {
    let take_u32 = |b: &mut &[u8]| -> Result<usize, String> {
        if b.len() < 4 {
            return Err("truncated header block".into());
        }
        let v = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        *b = &b[4..];
        Ok(v)
    };
    let n = take_u32(&mut b)?;
    if n > 4096 {
        return Err(format!("{n} headers"));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let field = |b: &mut &[u8]| -> Result<String, String> {
            let len = take_u32(b)?;
            if b.len() < len {
                return Err("truncated header block".into());
            }
            let s = String::from_utf8_lossy(&b[..len]).into_owned();
            *b = &b[len..];
            Ok(s)
        };
        let name = field(&mut b)?;
        let value = field(&mut b)?;
        out.push((name.to_ascii_lowercase(), value));
    }
    Ok(out)
}

/// The first value of header `name` (names compare case-insensitively;
/// multiple values are NUL-separated in one value).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.split('\0').next().unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn roundtrip(frames: &[Frame]) -> Vec<Frame> {
        let mut enc = Encoder::new();
        let mut dec = Decoder::new();
        let mut buf = BytesMut::new();
        for f in frames {
            enc.encode(f, &mut buf);
        }
        let mut out = Vec::new();
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            out.push(f);
        }
        assert!(buf.is_empty());
        out
    }

    #[test]
    fn every_frame_survives_a_roundtrip() {
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: h(&[
                    ("streamtype", "error"),
                    ("port", "8080"),
                    ("requestid", "0"),
                ]),
            },
            Frame::SynStream {
                stream_id: 3,
                associated_to: 0,
                priority: 7,
                flags: FLAG_FIN,
                headers: h(&[("streamtype", "data"), ("port", "8080"), ("requestid", "0")]),
            },
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: vec![],
            },
            Frame::Data {
                stream_id: 3,
                flags: 0,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream_id: 3,
                flags: FLAG_FIN,
                data: Bytes::new(),
            },
            Frame::RstStream {
                stream_id: 5,
                status: RST_CANCEL,
            },
            Frame::Settings(vec![(0, 7, 65536), (1, 4, 100)]),
            Frame::Ping(7),
            Frame::GoAway {
                last_good_stream_id: 3,
                status: 0,
            },
            Frame::Headers {
                stream_id: 3,
                flags: 0,
                headers: h(&[("x", "y\0z")]),
            },
            Frame::WindowUpdate {
                stream_id: 3,
                delta: 1 << 20,
            },
        ];
        assert_eq!(roundtrip(&frames), frames);
    }

    /// Bytes laid out by hand from the format: a data frame and a PING.
    #[test]
    fn wire_layout_of_data_and_ping() {
        let mut enc = Encoder::new();
        let mut buf = BytesMut::new();
        enc.encode(
            &Frame::Data {
                stream_id: 5,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"ab"),
            },
            &mut buf,
        );
        enc.encode(&Frame::Ping(2), &mut buf);
        assert_eq!(
            &buf[..],
            &[
                0, 0, 0, 5, 1, 0, 0, 2, b'a', b'b', // data
                0x80, 3, 0, 6, 0, 0, 0, 4, 0, 0, 0, 2, // ping
            ]
        );
    }

    /// Header blocks compressed by another zlib (C zlib, level 9, with the
    /// dictionary and a sync flush after each block: what Go's framer
    /// writes), as the second and third SYN_STREAM of a connection would
    /// carry them: one compression stream across frames.
    #[test]
    fn decodes_header_blocks_from_another_zlib() {
        let blocks = [
            "78f9e3c6a7c202253a48f95b044eea16061606409ab308125f99a074cc68004e892545a989b9d0c2863515141500000000ffff",
            "225333a8a44a04000000ffff",
        ];
        let mut buf = BytesMut::new();
        for (i, hex) in blocks.iter().enumerate() {
            let block: Vec<u8> = (0..hex.len() / 2)
                .map(|j| u8::from_str_radix(&hex[2 * j..2 * j + 2], 16).unwrap())
                .collect();
            buf.put_u16(0x8003);
            buf.put_u16(TYPE_SYN_STREAM);
            buf.put_u32((10 + block.len()) as u32);
            buf.put_u32(2 * i as u32 + 1);
            buf.put_u32(0);
            buf.put_u16(0);
            buf.extend_from_slice(&block);
        }
        let mut dec = Decoder::new();
        let types = ["error", "data"];
        for (i, t) in types.iter().enumerate() {
            let Some(Frame::SynStream {
                stream_id, headers, ..
            }) = dec.decode(&mut buf).unwrap()
            else {
                panic!("expected a SYN_STREAM")
            };
            assert_eq!(stream_id, 2 * i as u32 + 1);
            assert_eq!(
                headers,
                h(&[("port", "8080"), ("requestid", "0"), ("streamtype", t)])
            );
        }
    }

    /// Our compressed blocks say which dictionary they need (the FDICT bit
    /// and the dictionary's Adler-32), as a Go reader expects.
    #[test]
    fn compressed_blocks_name_the_dictionary() {
        let mut enc = Encoder::new();
        let mut buf = BytesMut::new();
        enc.encode(
            &Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: vec![],
            },
            &mut buf,
        );
        let block = &buf[12..];
        assert_eq!(block[0] & 0x0f, 8, "deflate");
        assert_ne!(block[1] & 0x20, 0, "FDICT");
        assert_eq!(&block[2..6], &0xe3c6a7c2u32.to_be_bytes());
        assert_eq!(((block[0] as u16) << 8 | block[1] as u16) % 31, 0);
    }

    #[test]
    fn partial_input_waits_for_more() {
        let mut enc = Encoder::new();
        let mut whole = BytesMut::new();
        enc.encode(
            &Frame::Data {
                stream_id: 1,
                flags: 0,
                data: Bytes::from(vec![9u8; 1000]),
            },
            &mut whole,
        );
        let mut dec = Decoder::new();
        let mut buf = BytesMut::new();
        for (i, b) in whole.iter().enumerate() {
            assert_eq!(dec.decode(&mut buf).unwrap(), None, "at {i}");
            buf.put_u8(*b);
        }
        assert!(matches!(
            dec.decode(&mut buf).unwrap(),
            Some(Frame::Data { data, .. }) if data.len() == 1000
        ));
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut dec = Decoder::new();
        let mut buf = BytesMut::from(&[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1][..]);
        assert_eq!(dec.decode(&mut buf), Err(FrameError::Version(2)));
        let mut buf = BytesMut::from(&[0x80, 3, 0, 3, 0, 0, 0, 2, 0, 0][..]);
        assert!(matches!(
            dec.decode(&mut buf),
            Err(FrameError::Invalid {
                what: "RST_STREAM",
                ..
            })
        ));
        // A header block that is not zlib.
        let mut buf = BytesMut::from(&[0x80, 3, 0, 2, 0, 0, 0, 8, 0, 0, 0, 1, 1, 2, 3, 4][..]);
        assert!(matches!(
            dec.decode(&mut buf),
            Err(FrameError::HeaderBlock(_))
        ));
    }

    #[test]
    fn header_lookup() {
        let hs = h(&[("streamtype", "data"), ("port", "80\x0081")]);
        assert_eq!(header(&hs, "streamType"), Some("data"));
        assert_eq!(header(&hs, "PORT"), Some("80"));
        assert_eq!(header(&hs, "requestID"), None);
    }
}
