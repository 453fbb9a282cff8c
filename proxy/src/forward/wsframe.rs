//! WebSocket framing (RFC 6455 section 5) for the client side of a
//! port-forward stream, built for bulk data: a frame is written as one
//! contiguous buffer whose header goes into room kept in front of the
//! payload (no copy), the payload is masked in place a word at a time, and
//! the server's frames are parsed header by header so their payload can be
//! passed on piece by piece straight from the read buffer (no frame is
//! collected, however large). The opening handshake is HTTP's
//! ([`super::upgrade`]). Pure: no I/O.

/// Opcodes (RFC 6455 section 5.2).
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xa;

/// The longest header a client writes: 2 bytes, a 64-bit length, the mask key.
pub const MAX_HEADER: usize = 14;

/// The longest payload of a control frame.
pub const MAX_CONTROL: usize = 125;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("WebSocket frame with reserved bits set (no extension was negotiated)")]
    Reserved,
    #[error("WebSocket frame with unknown opcode {0:#x}")]
    Opcode(u8),
    #[error("fragmented or oversized WebSocket control frame (opcode {0:#x})")]
    Control(u8),
    #[error("masked WebSocket frame from the server")]
    Masked,
    #[error("WebSocket frame length out of range")]
    Length,
}

/// A frame header read from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    /// Payload length.
    pub len: u64,
}

impl Header {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Parses a server frame header at the start of `buf`: the header and its
/// length in bytes, or None while `buf` holds only part of it.
pub fn parse_header(buf: &[u8]) -> Result<Option<(Header, usize)>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    if !matches!(
        opcode,
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(FrameError::Opcode(opcode));
    }
    let (len, size) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u16::from_be_bytes([b[0], b[1]]) as u64, 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let len = u64::from_be_bytes(b.try_into().expect("8 bytes"));
                if len >> 63 != 0 {
                    return Err(FrameError::Length);
                }
                (len, 10)
            }
            None => return Ok(None),
        },
        n => (n as u64, 2),
    };
    let header = Header { fin, opcode, len };
    if header.is_control() && (!fin || len > MAX_CONTROL as u64) {
        return Err(FrameError::Control(opcode));
    }
    Ok(Some((header, size)))
}

/// Makes `buf[..MAX_HEADER + len]` a final, masked client frame of
/// `opcode` whose payload is `buf[MAX_HEADER..][..len]`: writes the header
/// into the end of the room in front of the payload, masks the payload in
/// place with `key`, and returns where the frame starts in `buf`.
pub fn client_frame(buf: &mut [u8], opcode: u8, len: usize, key: [u8; 4]) -> usize {
    let payload = MAX_HEADER..MAX_HEADER + len;
    mask(&mut buf[payload], key);
    let mut header = [0u8; MAX_HEADER];
    header[0] = 0x80 | opcode;
    let size = if len < 126 {
        header[1] = 0x80 | len as u8;
        2
    } else if len <= u16::MAX as usize {
        header[1] = 0x80 | 126;
        header[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        header[1] = 0x80 | 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    header[size..size + 4].copy_from_slice(&key);
    let start = MAX_HEADER - size - 4;
    buf[start..MAX_HEADER].copy_from_slice(&header[..size + 4]);
    start
}

/// A small final client frame (a control frame, or a short message), with
/// its own buffer.
pub fn small_client_frame(opcode: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_HEADER + payload.len()];
    buf[MAX_HEADER..].copy_from_slice(payload);
    let start = client_frame(&mut buf, opcode, payload.len(), key);
    buf.drain(..start);
    buf
}

/// XORs `buf` with the mask `key` (RFC 6455 section 5.3), `buf[0]` being
/// the first byte of a payload. Eight bytes at a time: the key repeated
/// twice fits a u64 and, as 8 is a multiple of 4, every word starts at key
/// byte 0; the compiler vectorises the loop further.
pub fn mask(buf: &mut [u8], key: [u8; 4]) {
    let k = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut words = buf.chunks_exact_mut(8);
    for w in &mut words {
        let v = u64::from_ne_bytes((&*w).try_into().expect("8 bytes")) ^ k;
        w.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// A fresh mask key: RFC 6455 wants it unpredictable (from a strong source
/// of entropy), so that a client's payload cannot steer what an
/// intermediary sees on the wire.
pub fn mask_key() -> [u8; 4] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_bytewise(buf: &mut [u8], key: [u8; 4]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }

    #[test]
    fn mask_matches_the_bytewise_definition_at_every_length_and_offset() {
        let key = [0x6d, 0xb6, 0xb2, 0x80];
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        // Payloads starting at every alignment, of every length up to 70
        // and some long ones: the word loop and the tail must agree with
        // the byte-at-a-time definition.
        for offset in 0..9 {
            for len in (0..70).chain([255, 256, 257, 291]) {
                if offset + len > data.len() {
                    continue;
                }
                let mut fast = data.clone();
                mask(&mut fast[offset..offset + len], key);
                let mut slow = data.clone();
                mask_bytewise(&mut slow[offset..offset + len], key);
                assert_eq!(fast, slow, "offset {offset}, length {len}");
                // Masking twice is the identity.
                mask(&mut fast[offset..offset + len], key);
                assert_eq!(fast, data);
            }
        }
    }

    #[test]
    fn rfc_6455_masked_hello() {
        // RFC 6455 section 5.7: a masked "Hello".
        let f = small_client_frame(OP_TEXT, b"Hello", [0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(
            f,
            [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
    }

    /// Unmasks a client frame as a server would: (opcode, payload).
    fn server_reads(frame: &[u8]) -> (u8, Vec<u8>) {
        assert_eq!(frame[0] & 0xf0, 0x80, "final, no reserved bits");
        assert_ne!(frame[1] & 0x80, 0, "masked");
        let (len, at) = match frame[1] & 0x7f {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        let key: [u8; 4] = frame[at..at + 4].try_into().unwrap();
        let mut payload = frame[at + 4..].to_vec();
        assert_eq!(payload.len(), len);
        mask_bytewise(&mut payload, key);
        (frame[0] & 0x0f, payload)
    }

    #[test]
    fn client_frames_of_each_length_form() {
        for len in [0, 1, 125, 126, 127, 65535, 65536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut buf = vec![0u8; MAX_HEADER + len];
            buf[MAX_HEADER..].copy_from_slice(&payload);
            let start = client_frame(&mut buf, OP_BINARY, len, mask_key());
            let (op, got) = server_reads(&buf[start..]);
            assert_eq!(op, OP_BINARY);
            assert!(got == payload, "length {len}");
        }
    }

    #[test]
    fn server_headers_parse_in_every_length_form() {
        assert_eq!(parse_header(&[]).unwrap(), None);
        assert_eq!(parse_header(&[0x82]).unwrap(), None);
        assert_eq!(
            parse_header(&[0x82, 5, 1, 2]).unwrap(),
            Some((
                Header {
                    fin: true,
                    opcode: OP_BINARY,
                    len: 5
                },
                2
            ))
        );
        assert_eq!(parse_header(&[0x02, 126, 1]).unwrap(), None);
        assert_eq!(
            parse_header(&[0x02, 126, 1, 0]).unwrap(),
            Some((
                Header {
                    fin: false,
                    opcode: OP_BINARY,
                    len: 256
                },
                4
            ))
        );
        let mut long = vec![0x80, 127];
        long.extend_from_slice(&(1u64 << 32).to_be_bytes());
        assert_eq!(parse_header(&long[..9]).unwrap(), None);
        assert_eq!(
            parse_header(&long).unwrap(),
            Some((
                Header {
                    fin: true,
                    opcode: OP_CONTINUATION,
                    len: 1 << 32
                },
                10
            ))
        );
    }

    #[test]
    fn bad_server_headers_are_errors() {
        assert_eq!(parse_header(&[0xc2, 0]), Err(FrameError::Reserved));
        assert_eq!(parse_header(&[0x82, 0x81]), Err(FrameError::Masked));
        assert_eq!(parse_header(&[0x83, 0]), Err(FrameError::Opcode(3)));
        assert_eq!(parse_header(&[0x09, 0]), Err(FrameError::Control(9)));
        assert_eq!(
            parse_header(&[0x89, 126, 0, 126]),
            Err(FrameError::Control(9))
        );
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(parse_header(&huge), Err(FrameError::Length));
    }
}
