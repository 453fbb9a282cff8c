//! The Kubernetes channel protocol of `pods/portforward` over WebSocket
//! (`v4.channel.k8s.io`, `v5.channel.k8s.io`). For port i of the request,
//! channel 2i carries data and 2i+1 errors; every binary message is one
//! channel byte followed by the payload. The first two bytes the server
//! sends on each channel are the port (u16 little endian). v5 adds a close
//! signal: the message `[255, channel]` half-closes that channel.
//! Pure: no I/O.

pub const CLOSE_SIGNAL: u8 = 255;

pub fn data_channel(port_index: u8) -> u8 {
    2 * port_index
}

pub fn error_channel(port_index: u8) -> u8 {
    2 * port_index + 1
}

/// A data message: the channel byte, then the payload.
pub fn encode(channel: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 1);
    v.push(channel);
    v.extend_from_slice(payload);
    v
}

/// v5's half-close of `channel`.
pub fn close_signal(channel: u8) -> Vec<u8> {
    vec![CLOSE_SIGNAL, channel]
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("empty message from the API server (no channel byte)")]
    Empty,
    #[error("the API server announced port {got} on channel {channel}, expected {expected}")]
    PortMismatch {
        channel: u8,
        got: u16,
        expected: u16,
    },
    #[error("message on unexpected channel {0}")]
    UnknownChannel(u8),
}

/// What one message from the server means for the forwarded connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// Bytes for the local client (may be empty: a header, or nothing).
    Data(&'a [u8]),
    /// Text on the error channel: this connection failed.
    Error(String),
    /// The server half-closed the data channel (v5 close signal).
    DataClosed,
    /// Nothing for the client (a header, or a close of the error channel).
    Nothing,
}

/// Per-channel state of the port header.
#[derive(Debug, Clone, Default)]
struct Header {
    buf: Vec<u8>,
    done: bool,
}

impl Header {
    /// Consumes header bytes from the front of `payload`; returns the rest.
    fn consume<'a>(
        &mut self,
        channel: u8,
        expected: u16,
        payload: &'a [u8],
    ) -> Result<&'a [u8], ChannelError> {
        if self.done {
            return Ok(payload);
        }
        let need = 2 - self.buf.len();
        let take = need.min(payload.len());
        self.buf.extend_from_slice(&payload[..take]);
        if self.buf.len() == 2 {
            self.done = true;
            let got = u16::from_le_bytes([self.buf[0], self.buf[1]]);
            if got != expected {
                return Err(ChannelError::PortMismatch {
                    channel,
                    got,
                    expected,
                });
            }
        }
        Ok(&payload[take..])
    }
}

/// Decodes the server's messages for one forwarded port (index `index`).
/// A message may arrive whole ([`Demux::on_message`]) or in pieces as its
/// frames are read ([`Demux::start_message`], [`Demux::on_piece`],
/// [`Demux::end_message`]), so that data is passed on without collecting
/// the message first.
#[derive(Debug, Clone)]
pub struct Demux {
    index: u8,
    port: u16,
    data: Header,
    error: Header,
    /// The channel of the message being read (None before its first byte).
    channel: Option<u8>,
    /// Of a close signal being read: whether its channel byte was seen.
    signal_done: bool,
    /// Text of the error channel's message being read.
    error_text: Vec<u8>,
}

impl Demux {
    pub fn new(index: u8, port: u16) -> Self {
        Demux {
            index,
            port,
            data: Header::default(),
            error: Header::default(),
            channel: None,
            signal_done: false,
            error_text: Vec::new(),
        }
    }

    pub fn data_channel(&self) -> u8 {
        data_channel(self.index)
    }

    /// One whole binary message from the server.
    pub fn on_message<'a>(&mut self, msg: &'a [u8]) -> Result<Event<'a>, ChannelError> {
        self.start_message();
        let event = self.on_piece(msg)?;
        match self.end_message()? {
            Event::Nothing => Ok(event),
            end => Ok(end),
        }
    }

    /// A new message begins.
    pub fn start_message(&mut self) {
        self.channel = None;
        self.signal_done = false;
        self.error_text.clear();
    }

    /// The next bytes of the current message.
    pub fn on_piece<'a>(&mut self, piece: &'a [u8]) -> Result<Event<'a>, ChannelError> {
        let (ch, payload) = match self.channel {
            Some(ch) => (ch, piece),
            None => match piece.split_first() {
                Some((&ch, rest)) => {
                    self.channel = Some(ch);
                    (ch, rest)
                }
                None => return Ok(Event::Nothing),
            },
        };
        if ch == CLOSE_SIGNAL {
            let Some(&c) = payload.first().filter(|_| !self.signal_done) else {
                return Ok(Event::Nothing);
            };
            self.signal_done = true;
            return Ok(if c == data_channel(self.index) {
                Event::DataClosed
            } else {
                Event::Nothing
            });
        }
        if ch == data_channel(self.index) {
            let rest = self.data.consume(ch, self.port, payload)?;
            Ok(if rest.is_empty() {
                Event::Nothing
            } else {
                Event::Data(rest)
            })
        } else if ch == error_channel(self.index) {
            // Collected: the text is reported whole, at the message's end.
            let rest = self.error.consume(ch, self.port, payload)?;
            self.error_text.extend_from_slice(rest);
            Ok(Event::Nothing)
        } else {
            Err(ChannelError::UnknownChannel(ch))
        }
    }

    /// The current message ended: its error text, if it carried one.
    pub fn end_message(&mut self) -> Result<Event<'static>, ChannelError> {
        if self.channel.is_none() {
            return Err(ChannelError::Empty);
        }
        if self.error_text.is_empty() {
            return Ok(Event::Nothing);
        }
        let text = String::from_utf8_lossy(&self.error_text).trim().to_string();
        self.error_text.clear();
        Ok(Event::Error(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_of_a_port_index() {
        assert_eq!((data_channel(0), error_channel(0)), (0, 1));
        assert_eq!((data_channel(3), error_channel(3)), (6, 7));
    }

    #[test]
    fn encode_prefixes_the_channel() {
        assert_eq!(encode(0, b"abc"), b"\x00abc");
        assert_eq!(encode(4, b""), vec![4]);
        assert_eq!(close_signal(2), vec![255, 2]);
    }

    #[test]
    fn headers_are_consumed_then_data_flows() {
        let mut d = Demux::new(0, 8080);
        let p = 8080u16.to_le_bytes();
        assert_eq!(d.on_message(&[0, p[0], p[1]]).unwrap(), Event::Nothing);
        assert_eq!(d.on_message(&[1, p[0], p[1]]).unwrap(), Event::Nothing);
        assert_eq!(d.on_message(b"\x00hello").unwrap(), Event::Data(b"hello"));
        // Bytes equal to a port header after the header are data.
        assert_eq!(d.on_message(&[0, p[0], p[1]]).unwrap(), Event::Data(&p[..]));
        assert_eq!(d.on_message(&[0]).unwrap(), Event::Nothing);
    }

    #[test]
    fn header_split_or_joined_with_data() {
        let p = 443u16.to_le_bytes();
        let mut d = Demux::new(0, 443);
        assert_eq!(d.on_message(&[0, p[0]]).unwrap(), Event::Nothing);
        assert_eq!(d.on_message(&[0, p[1], b'x']).unwrap(), Event::Data(b"x"));
        let mut d = Demux::new(0, 443);
        assert_eq!(
            d.on_message(&[0, p[0], p[1], b'a', b'b']).unwrap(),
            Event::Data(b"ab")
        );
    }

    #[test]
    fn error_channel_text_is_an_error() {
        let mut d = Demux::new(1, 80);
        let p = 80u16.to_le_bytes();
        assert_eq!(d.on_message(&[3, p[0], p[1]]).unwrap(), Event::Nothing);
        let mut msg = vec![3];
        msg.extend_from_slice(b"error forwarding port 80: connection refused\n");
        assert_eq!(
            d.on_message(&msg).unwrap(),
            Event::Error("error forwarding port 80: connection refused".into())
        );
    }

    #[test]
    fn wrong_port_and_unknown_channels_are_errors() {
        let mut d = Demux::new(0, 80);
        assert_eq!(
            d.on_message(&[0, 81, 0]).unwrap_err(),
            ChannelError::PortMismatch {
                channel: 0,
                got: 81,
                expected: 80
            }
        );
        assert_eq!(
            d.on_message(&[2, 1]).unwrap_err(),
            ChannelError::UnknownChannel(2)
        );
        assert_eq!(d.on_message(&[]).unwrap_err(), ChannelError::Empty);
    }

    #[test]
    fn close_signal_of_the_data_channel() {
        let mut d = Demux::new(0, 80);
        assert_eq!(d.on_message(&[255, 0]).unwrap(), Event::DataClosed);
        assert_eq!(d.on_message(&[255, 1]).unwrap(), Event::Nothing);
        assert_eq!(d.data_channel(), 0);
    }
    #[test]
    fn a_message_in_pieces_gives_the_same_as_whole() {
        let p = 8080u16.to_le_bytes();
        let mut d = Demux::new(0, 8080);
        // The channel byte alone, then the header split, then data.
        d.start_message();
        assert_eq!(d.on_piece(&[0]).unwrap(), Event::Nothing);
        assert_eq!(d.on_piece(&[p[0]]).unwrap(), Event::Nothing);
        assert_eq!(d.on_piece(&[p[1], b'a']).unwrap(), Event::Data(b"a"));
        assert_eq!(d.on_piece(b"bc").unwrap(), Event::Data(b"bc"));
        assert_eq!(d.end_message().unwrap(), Event::Nothing);
        // A later message: its first byte is a channel again.
        d.start_message();
        assert_eq!(d.on_piece(b"\x00xy").unwrap(), Event::Data(b"xy"));
        assert_eq!(d.end_message().unwrap(), Event::Nothing);
        // Error text split over pieces is reported whole at the end.
        d.start_message();
        assert_eq!(d.on_piece(&[1, p[0], p[1], b'n']).unwrap(), Event::Nothing);
        assert_eq!(d.on_piece(b"o route\n").unwrap(), Event::Nothing);
        assert_eq!(d.end_message().unwrap(), Event::Error("no route".into()));
        // A close signal whose channel comes in the next piece.
        d.start_message();
        assert_eq!(d.on_piece(&[255]).unwrap(), Event::Nothing);
        assert_eq!(d.on_piece(&[0, 0]).unwrap(), Event::DataClosed);
        assert_eq!(d.on_piece(&[0]).unwrap(), Event::Nothing);
        assert_eq!(d.end_message().unwrap(), Event::Nothing);
        // A message without a single byte.
        d.start_message();
        assert_eq!(d.on_piece(&[]).unwrap(), Event::Nothing);
        assert_eq!(d.end_message().unwrap_err(), ChannelError::Empty);
    }
}
