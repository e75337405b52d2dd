//! Following the Fluentd Forward protocol's framing as bytes pass through,
//! to find a quiet moment (SPEC §9): a message boundary with every `chunk`
//! sent so far acknowledged.
//!
//! The bytes are never copied or changed: each direction's msgpack stream is
//! parsed incrementally, token by token, from the relay's buffer; payloads
//! are skipped by count. Only short strings the protocol gives meaning to (a
//! `chunk` id, an `ack`, the handshake's `HELO`/`PONG`) are kept, in small
//! fixed buffers. Anything the grammar does not allow marks the connection
//! malformed, which only turns recycling off for it.

/// Deepest nesting of msgpack containers followed (records nest maps in
/// arrays in maps); deeper is malformed.
const MAX_DEPTH: usize = 32;

/// Longest `chunk` id followed (Fluent Bit's are 24 base64 characters).
const MAX_CHUNK_ID: usize = 64;

/// Chunks sent and not yet acknowledged on one connection; more is malformed
/// (a real sender waits for its acks long before this).
const MAX_OUTSTANDING: usize = 1024;

/// One short string kept from the stream.
#[derive(Clone, Copy)]
struct Captured {
    bytes: [u8; MAX_CHUNK_ID],
    len: usize,
}

impl Captured {
    const EMPTY: Captured = Captured {
        bytes: [0; MAX_CHUNK_ID],
        len: 0,
    };

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// What a container is, for the grammar.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A top-level array from the client: a Forward message or `PING`.
    Message {
        /// Items in the array.
        len: u64,
        /// Where the option map is, once the second item showed the mode.
        options_at: Option<u64>,
    },
    /// A message's option map (keys `chunk`, `size`, `compressed`).
    Options { key_is_chunk: bool },
    /// A top-level map from the server: `{"ack": ID}`.
    Reply { key_is_ack: bool },
    /// A top-level array from the server: `HELO` or `PONG` of the handshake.
    Greeting,
    /// Anything inside a record or entry: skipped.
    Other,
}

#[derive(Clone, Copy)]
struct Frame {
    role: Role,
    /// Items read so far (a map counts keys and values).
    index: u64,
    /// Items still to read.
    remaining: u64,
}

/// The kind of a msgpack value, as far as the grammar cares.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Integers, floats, nil, booleans.
    Scalar,
    Str,
    Bin,
    Ext,
    Array,
    Map,
}

/// Which way a parser's bytes go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Client -> upstream: messages.
    Requests,
    /// Upstream -> client: acks and the handshake.
    Replies,
}

/// What both directions share: the chunks waiting for their acks.
struct Pending {
    outstanding: Vec<Captured>,
    /// The server greeted (`HELO`) and has not yet answered the `PING`.
    handshake: bool,
}

/// One direction's incremental msgpack reader.
struct Parser {
    way: Way,
    stack: Vec<Frame>,
    /// The current token's header: its first byte and length bytes.
    header: [u8; 9],
    header_len: usize,
    header_need: usize,
    /// Payload bytes of the current token still to pass.
    skip: u64,
    /// Payload being kept (the current token is a string the grammar wants).
    capture: Option<Captured>,
    /// The current top-level request carries this `chunk` id.
    chunk: Option<Captured>,
}

/// Follows both directions of one Forward connection.
pub struct ForwardFollower {
    requests: Parser,
    replies: Parser,
    pending: Pending,
    malformed: bool,
}

impl Default for ForwardFollower {
    fn default() -> Self {
        ForwardFollower {
            requests: Parser::new(Way::Requests),
            replies: Parser::new(Way::Replies),
            pending: Pending {
                outstanding: Vec::new(),
                handshake: false,
            },
            malformed: false,
        }
    }
}

impl ForwardFollower {
    /// Bytes the client sent, in order, as the relay reads them.
    pub fn client_bytes(&mut self, bytes: &[u8]) {
        if !self.malformed {
            self.malformed = self.requests.feed(bytes, &mut self.pending).is_err();
        }
    }

    /// Bytes the server sent, in order, as the relay reads them.
    pub fn upstream_bytes(&mut self, bytes: &[u8]) {
        if !self.malformed {
            self.malformed = self.replies.feed(bytes, &mut self.pending).is_err();
        }
    }

    /// How many of the next bytes one way the follower would pass without
    /// looking (the rest of a payload it skips by count): the relay may move
    /// them unseen and report them with [`Self::passed_unseen`]. Everything,
    /// once the stream is malformed.
    pub fn unseen_run(&self, client_to_upstream: bool) -> u64 {
        if self.malformed {
            return u64::MAX;
        }
        self.parser(client_to_upstream).unseen_run()
    }

    /// `count` bytes of the unseen run went by without being fed.
    pub fn passed_unseen(&mut self, client_to_upstream: bool, count: u64) {
        if self.malformed {
            return;
        }
        let parser = if client_to_upstream {
            &mut self.requests
        } else {
            &mut self.replies
        };
        self.malformed = parser.pass_unseen(count, &mut self.pending).is_err();
    }

    fn parser(&self, client_to_upstream: bool) -> &Parser {
        if client_to_upstream {
            &self.requests
        } else {
            &self.replies
        }
    }

    /// Whether the stream broke the grammar: recycling is off for good.
    #[cfg(test)]
    pub fn is_malformed(&self) -> bool {
        self.malformed
    }

    /// A quiet moment: both directions between messages, no handshake under
    /// way, and every chunk acknowledged.
    pub fn is_quiet(&self) -> bool {
        !self.malformed
            && self.requests.at_boundary()
            && self.replies.at_boundary()
            && !self.pending.handshake
            && self.pending.outstanding.is_empty()
    }
}

/// The stream broke the grammar.
struct Malformed;

impl Parser {
    fn new(way: Way) -> Parser {
        Parser {
            way,
            stack: Vec::new(),
            header: [0; 9],
            header_len: 0,
            header_need: 0,
            skip: 0,
            capture: None,
            chunk: None,
        }
    }

    fn at_boundary(&self) -> bool {
        self.stack.is_empty() && self.header_len == 0 && self.skip == 0
    }

    /// Payload bytes still to pass that nobody keeps.
    fn unseen_run(&self) -> u64 {
        if self.capture.is_some() {
            0
        } else {
            self.skip
        }
    }

    /// Passes `count` bytes of the unseen run; more than it holds breaks
    /// the relay's side of the bargain and is treated as malformed.
    fn pass_unseen(&mut self, count: u64, pending: &mut Pending) -> Result<(), Malformed> {
        if count == 0 {
            return Ok(());
        }
        if count > self.unseen_run() {
            return Err(Malformed);
        }
        self.skip -= count;
        if self.skip == 0 {
            self.payload_done(pending)?;
        }
        Ok(())
    }

    fn feed(&mut self, mut bytes: &[u8], pending: &mut Pending) -> Result<(), Malformed> {
        while let Some(&first) = bytes.first() {
            if self.skip > 0 {
                let take = bytes
                    .len()
                    .min(usize::try_from(self.skip).unwrap_or(usize::MAX));
                if let Some(captured) = &mut self.capture {
                    // The capture was sized to the whole payload up front.
                    captured.bytes[captured.len..captured.len + take]
                        .copy_from_slice(&bytes[..take]);
                    captured.len += take;
                }
                self.skip -= take as u64;
                bytes = &bytes[take..];
                if self.skip == 0 {
                    self.payload_done(pending)?;
                }
                continue;
            }
            if self.header_len == 0 {
                self.header_need = 1 + header_extra(first).ok_or(Malformed)?;
            }
            let take = (self.header_need - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&bytes[..take]);
            self.header_len += take;
            bytes = &bytes[take..];
            if self.header_len == self.header_need {
                self.header_len = 0;
                self.token(pending)?;
            }
        }
        Ok(())
    }

    /// A complete header is in `self.header`.
    fn token(&mut self, pending: &mut Pending) -> Result<(), Malformed> {
        let first = self.header[0];
        let length = |bytes: &[u8]| bytes.iter().fold(0u64, |n, &b| (n << 8) | u64::from(b));
        let extra = &self.header[1..self.header_need];
        let (kind, size) = match first {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (Kind::Scalar, 0),
            0x80..=0x8f => (Kind::Map, u64::from(first & 0x0f)),
            0x90..=0x9f => (Kind::Array, u64::from(first & 0x0f)),
            0xa0..=0xbf => (Kind::Str, u64::from(first & 0x1f)),
            0xc4..=0xc6 => (Kind::Bin, length(extra)),
            // The length, then one type byte that is part of the header.
            0xc7..=0xc9 => (Kind::Ext, length(&extra[..extra.len() - 1])),
            0xca | 0xce | 0xd2 => (Kind::Scalar, 4),
            0xcb | 0xcf | 0xd3 => (Kind::Scalar, 8),
            0xcc | 0xd0 => (Kind::Scalar, 1),
            0xcd | 0xd1 => (Kind::Scalar, 2),
            // fixext 1, 2, 4, 8, 16: the type byte and the data.
            0xd4..=0xd8 => (Kind::Ext, 1 + (1 << (first - 0xd4))),
            0xd9..=0xdb => (Kind::Str, length(extra)),
            0xdc | 0xdd => (Kind::Array, length(extra)),
            0xde | 0xdf => (Kind::Map, length(extra)),
            // header_extra refused 0xc1.
            0xc1 => return Err(Malformed),
        };
        let start = self.value_start(kind, size)?;
        match kind {
            Kind::Array | Kind::Map => {
                let items = if kind == Kind::Map { size * 2 } else { size };
                if items == 0 {
                    return self.value_done(pending);
                }
                if self.stack.len() >= MAX_DEPTH {
                    return Err(Malformed);
                }
                self.stack.push(Frame {
                    role: start.role,
                    index: 0,
                    remaining: items,
                });
                Ok(())
            }
            Kind::Scalar | Kind::Str | Kind::Bin | Kind::Ext => {
                self.capture = start.keep.then_some(Captured::EMPTY);
                self.skip = size;
                if size == 0 {
                    self.payload_done(pending)?;
                }
                Ok(())
            }
        }
    }

    /// A value of `kind` and `size` (bytes, or items of a container) starts:
    /// what the grammar makes of it where it stands.
    fn value_start(&mut self, kind: Kind, size: u64) -> Result<Start, Malformed> {
        let textual = matches!(kind, Kind::Str | Kind::Bin);
        let Some(parent) = self.stack.last_mut() else {
            let role = match (self.way, kind) {
                (Way::Requests, Kind::Array) if size >= 2 => Role::Message {
                    len: size,
                    options_at: None,
                },
                (Way::Replies, Kind::Map) => Role::Reply { key_is_ack: false },
                (Way::Replies, Kind::Array) => Role::Greeting,
                _ => return Err(Malformed),
            };
            return Ok(Start { role, keep: false });
        };
        let is_key = parent.index % 2 == 0;
        let mut start = Start {
            role: Role::Other,
            keep: false,
        };
        match &mut parent.role {
            Role::Message { len, options_at } => {
                if parent.index == 1 {
                    // [tag, time, record, option?] or [tag, entries, option?]
                    *options_at = match kind {
                        Kind::Scalar | Kind::Ext => (*len == 4).then_some(3),
                        _ => (*len == 3).then_some(2),
                    };
                }
                if kind == Kind::Map && *options_at == Some(parent.index) {
                    start.role = Role::Options {
                        key_is_chunk: false,
                    };
                }
            }
            // Keys are kept when short enough to be the word looked for;
            // the value after `chunk` or `ack` is the id.
            Role::Options { key_is_chunk: flag } | Role::Reply { key_is_ack: flag } => {
                if is_key {
                    *flag = false;
                    start.keep = textual && size <= 5;
                } else if *flag {
                    if !textual || size > MAX_CHUNK_ID as u64 {
                        return Err(Malformed);
                    }
                    start.keep = true;
                }
            }
            Role::Greeting => start.keep = textual && parent.index == 0 && size == 4,
            Role::Other => {}
        }
        Ok(start)
    }

    /// The current token's payload has passed.
    fn payload_done(&mut self, pending: &mut Pending) -> Result<(), Malformed> {
        if let (Some(captured), Some(parent)) = (self.capture.take(), self.stack.last_mut()) {
            let text = captured.as_slice();
            let is_key = parent.index % 2 == 0;
            match &mut parent.role {
                Role::Options { key_is_chunk } if is_key => *key_is_chunk = text == b"chunk",
                Role::Options { .. } => self.chunk = Some(captured),
                Role::Reply { key_is_ack } if is_key => *key_is_ack = text == b"ack",
                Role::Reply { .. } => {
                    pending.outstanding.retain(|chunk| chunk.as_slice() != text);
                }
                Role::Greeting => match text {
                    b"HELO" => pending.handshake = true,
                    b"PONG" => pending.handshake = false,
                    _ => {}
                },
                Role::Message { .. } | Role::Other => {}
            }
        }
        self.value_done(pending)
    }

    /// A value ended: count it in its container, closing every container
    /// it completes; a top-level value ends a message.
    fn value_done(&mut self, pending: &mut Pending) -> Result<(), Malformed> {
        loop {
            let Some(frame) = self.stack.last_mut() else {
                return self.message_done(pending);
            };
            frame.index += 1;
            frame.remaining -= 1;
            if frame.remaining > 0 {
                return Ok(());
            }
            self.stack.pop();
        }
    }

    fn message_done(&mut self, pending: &mut Pending) -> Result<(), Malformed> {
        if let Some(chunk) = self.chunk.take() {
            if pending.outstanding.len() >= MAX_OUTSTANDING {
                return Err(Malformed);
            }
            pending.outstanding.push(chunk);
        }
        Ok(())
    }
}

/// What the grammar makes of a value where it starts.
struct Start {
    /// The role of the container it opens, if it is one.
    role: Role,
    /// Keep the string's bytes.
    keep: bool,
}

/// Header bytes after the first for a token starting with `first` (lengths,
/// and an ext's type byte); `None` for the byte msgpack never uses.
fn header_extra(first: u8) -> Option<usize> {
    Some(match first {
        0xc1 => return None,
        0xc4 | 0xd9 => 1,
        0xc5 | 0xda | 0xdc | 0xde => 2,
        0xc6 | 0xdb | 0xdd | 0xdf => 4,
        0xc7 => 2,
        0xc8 => 3,
        0xc9 => 5,
        _ => 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;

    fn encode(value: &Value) -> Vec<u8> {
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, value).expect("encodes");
        bytes
    }

    fn text(s: &str) -> Value {
        Value::from(s)
    }

    fn map(pairs: &[(&str, Value)]) -> Value {
        Value::Map(pairs.iter().map(|(k, v)| (text(k), v.clone())).collect())
    }

    fn record() -> Value {
        // A record that itself has a key `chunk`: not an option.
        map(&[
            ("log", text("hello")),
            ("chunk", text("not-an-option")),
            ("nested", Value::Array(vec![map(&[("a", Value::from(1))])])),
        ])
    }

    fn ack(id: &str) -> Vec<u8> {
        encode(&map(&[("ack", text(id))]))
    }

    /// Feeds the bytes one at a time: every token split across reads.
    fn feed_bytewise(follower: &mut ForwardFollower, bytes: &[u8], client: bool) {
        for byte in bytes.chunks(1) {
            if client {
                follower.client_bytes(byte);
            } else {
                follower.upstream_bytes(byte);
            }
        }
    }

    fn event_time() -> Value {
        Value::Ext(0, vec![0x5f, 0, 0, 0, 0, 0, 0, 1])
    }

    #[test]
    fn every_mode_with_chunk_is_quiet_only_once_acked() {
        let options = |id: &str| map(&[("chunk", text(id)), ("size", Value::from(2))]);
        let entries = Value::Array(vec![
            Value::Array(vec![Value::from(1), record()]),
            Value::Array(vec![event_time(), record()]),
        ]);
        let packed = Value::Binary(encode(&Value::Array(vec![Value::from(1), record()])));
        let messages = [
            // Message mode, integer time and EventTime.
            Value::Array(vec![text("t"), Value::from(1), record(), options("m1")]),
            Value::Array(vec![text("t"), event_time(), record(), options("m2")]),
            // Forward mode.
            Value::Array(vec![text("t"), entries, options("f1")]),
            // PackedForward, as bin and as str.
            Value::Array(vec![text("t"), packed.clone(), options("p1")]),
            // CompressedPackedForward: the payload is opaque to sluice.
            Value::Array(vec![
                text("t"),
                Value::Binary(vec![0x1f, 0x8b, 0, 1, 2, 3]),
                map(&[("compressed", text("gzip")), ("chunk", text("c1"))]),
            ]),
        ];
        for (message, id) in messages.iter().zip(["m1", "m2", "f1", "p1", "c1"]) {
            let mut follower = ForwardFollower::default();
            assert!(follower.is_quiet());
            let bytes = encode(message);
            feed_bytewise(&mut follower, &bytes[..bytes.len() - 1], true);
            assert!(!follower.is_quiet(), "{id}: quiet inside a message");
            feed_bytewise(&mut follower, &bytes[bytes.len() - 1..], true);
            assert!(!follower.is_quiet(), "{id}: quiet before the ack");
            follower.upstream_bytes(&ack("other"));
            assert!(!follower.is_quiet(), "{id}: another chunk's ack counted");
            let reply = ack(id);
            feed_bytewise(&mut follower, &reply[..reply.len() - 1], false);
            assert!(!follower.is_quiet(), "{id}: quiet inside the ack");
            follower.upstream_bytes(&reply[reply.len() - 1..]);
            assert!(follower.is_quiet(), "{id}: not quiet after its ack");
            assert!(!follower.is_malformed());
        }
    }

    #[test]
    fn messages_without_chunk_are_quiet_at_each_boundary() {
        let mut follower = ForwardFollower::default();
        let message = encode(&Value::Array(vec![text("t"), Value::from(1), record()]));
        let mut stream = message.clone();
        stream.extend_from_slice(&message);
        follower.client_bytes(&stream[..message.len() + 3]);
        assert!(!follower.is_quiet());
        follower.client_bytes(&stream[message.len() + 3..]);
        assert!(follower.is_quiet());
    }

    #[test]
    fn several_chunks_wait_for_every_ack() {
        let mut follower = ForwardFollower::default();
        for id in ["a", "b"] {
            let options = map(&[("chunk", text(id))]);
            follower.client_bytes(&encode(&Value::Array(vec![
                text("t"),
                Value::from(1),
                record(),
                options,
            ])));
        }
        follower.upstream_bytes(&ack("b"));
        assert!(!follower.is_quiet());
        follower.upstream_bytes(&ack("a"));
        assert!(follower.is_quiet());
    }

    #[test]
    fn the_shared_key_handshake_is_not_a_quiet_moment() {
        let mut follower = ForwardFollower::default();
        let helo = encode(&Value::Array(vec![
            text("HELO"),
            map(&[
                ("nonce", Value::Binary(vec![1; 16])),
                ("keepalive", Value::from(true)),
            ]),
        ]));
        follower.upstream_bytes(&helo);
        assert!(!follower.is_quiet());
        let ping = encode(&Value::Array(vec![
            text("PING"),
            text("client"),
            Value::Binary(vec![2; 16]),
            text("0123abcd"),
            text(""),
            text(""),
        ]));
        follower.client_bytes(&ping);
        assert!(!follower.is_quiet());
        let pong = encode(&Value::Array(vec![
            text("PONG"),
            Value::from(true),
            text(""),
            text("server"),
            text("abcd0123"),
        ]));
        follower.upstream_bytes(&pong);
        assert!(follower.is_quiet());
    }

    #[test]
    fn a_stream_outside_the_grammar_is_malformed_for_good() {
        for bytes in [
            &b"hello\n"[..],                             // text: a fixint at the top level
            &[0xc1][..],                                 // the byte msgpack never uses
            &encode(&text("tag"))[..],                   // a string, not a message
            &encode(&Value::Array(vec![text("t")]))[..], // too short
        ] {
            let mut follower = ForwardFollower::default();
            follower.client_bytes(bytes);
            assert!(follower.is_malformed(), "{bytes:?}");
            assert!(!follower.is_quiet());
            // Even a valid message later does not bring it back.
            follower.client_bytes(&encode(&Value::Array(vec![
                text("t"),
                Value::from(1),
                record(),
            ])));
            assert!(!follower.is_quiet());
        }
        let mut follower = ForwardFollower::default();
        follower.upstream_bytes(&encode(&Value::from(7)));
        assert!(follower.is_malformed());
    }

    #[test]
    fn bounds_depth_chunk_id_and_outstanding_acks() {
        let mut nested = record();
        for _ in 0..MAX_DEPTH {
            nested = Value::Array(vec![nested]);
        }
        let mut follower = ForwardFollower::default();
        follower.client_bytes(&encode(&Value::Array(vec![
            text("t"),
            Value::from(1),
            nested,
        ])));
        assert!(follower.is_malformed(), "nesting past MAX_DEPTH");

        let long = "x".repeat(MAX_CHUNK_ID + 1);
        let mut follower = ForwardFollower::default();
        follower.client_bytes(&encode(&Value::Array(vec![
            text("t"),
            Value::from(1),
            record(),
            map(&[("chunk", text(&long))]),
        ])));
        assert!(follower.is_malformed(), "a chunk id past MAX_CHUNK_ID");

        let mut follower = ForwardFollower::default();
        for n in 0..MAX_OUTSTANDING {
            follower.client_bytes(&encode(&Value::Array(vec![
                text("t"),
                Value::from(1),
                record(),
                map(&[("chunk", text(&n.to_string()))]),
            ])));
        }
        assert!(!follower.is_malformed(), "MAX_OUTSTANDING is allowed");
        follower.client_bytes(&encode(&Value::Array(vec![
            text("t"),
            Value::from(1),
            record(),
            map(&[("chunk", text("one-more"))]),
        ])));
        assert!(follower.is_malformed(), "past MAX_OUTSTANDING");
    }

    /// PackedForward messages whose entries are `size` bytes, chunk ids
    /// `id-0`, `id-1`, ...
    fn packed_stream(count: usize, size: usize) -> Vec<u8> {
        let mut stream = Vec::new();
        for n in 0..count {
            stream.extend(encode(&Value::Array(vec![
                text("tag"),
                Value::Binary(vec![n as u8; size]),
                map(&[("chunk", text(&format!("id-{n}")))]),
            ])));
        }
        stream
    }

    #[test]
    fn a_payload_passed_unseen_is_followed_like_one_fed() {
        let stream = packed_stream(3, 100_000);
        let mut follower = ForwardFollower::default();
        assert_eq!(follower.unseen_run(true), 0, "between messages");
        let mut at = 0;
        let mut unseen = 0;
        while at < stream.len() {
            let run = follower.unseen_run(true);
            if run > 0 {
                // A relay splices what the pipe takes, never more than the run.
                let step = run.min(65_536);
                follower.passed_unseen(true, step);
                at += step as usize;
                unseen += step;
            } else {
                follower.client_bytes(&stream[at..at + 1]);
                at += 1;
            }
        }
        assert!(unseen >= 3 * 99_000, "only {unseen} bytes unseen");
        assert!(!follower.is_malformed());
        assert!(!follower.is_quiet(), "the chunks wait for their acks");
        assert_eq!(follower.unseen_run(false), 0);
        for n in 0..3 {
            follower.upstream_bytes(&ack(&format!("id-{n}")));
        }
        assert!(follower.is_quiet());
    }

    #[test]
    fn a_chunk_id_is_never_unseen_and_passing_past_the_run_is_malformed() {
        let stream = packed_stream(1, 1_000);
        let options_at = stream.len() - encode(&map(&[("chunk", text("id-0"))])).len();
        let mut follower = ForwardFollower::default();
        follower.client_bytes(&stream[..options_at + 4]);
        assert_eq!(follower.unseen_run(true), 0, "inside the kept `chunk` key");
        let mut follower = ForwardFollower::default();
        follower.client_bytes(&stream[..10]);
        let run = follower.unseen_run(true);
        assert!(run > 900);
        follower.passed_unseen(true, run + 1);
        assert!(follower.is_malformed());
        assert_eq!(follower.unseen_run(true), u64::MAX, "malformed: all unseen");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Any bytes, in any pieces, either way: no panic.
            #[test]
            fn any_bytes_in_any_pieces_never_panic(
                bytes in proptest::collection::vec(any::<u8>(), 0..512),
                cut in 1usize..64,
            ) {
                let mut follower = ForwardFollower::default();
                for piece in bytes.chunks(cut) {
                    follower.client_bytes(piece);
                    follower.upstream_bytes(piece);
                }
                let _ = follower.is_quiet();
            }

            /// PackedForward messages of any size, their payloads passed
            /// unseen in pieces of any size: followed exactly.
            #[test]
            fn payloads_passed_unseen_in_any_pieces_are_followed(
                count in 1usize..5,
                size in 0usize..5_000,
                cut in 1usize..40,
                step in 1u64..3_000,
            ) {
                let stream = packed_stream(count, size);
                let mut follower = ForwardFollower::default();
                let mut at = 0;
                while at < stream.len() {
                    let run = follower.unseen_run(true);
                    if run > 0 {
                        follower.passed_unseen(true, run.min(step));
                        at += run.min(step) as usize;
                    } else {
                        // A buffer read: the framing and whatever follows.
                        let end = (at + cut).min(stream.len());
                        follower.client_bytes(&stream[at..end]);
                        at = end;
                    }
                }
                prop_assert!(!follower.is_malformed());
                for n in 0..count {
                    follower.upstream_bytes(&ack(&format!("id-{n}")));
                }
                prop_assert!(follower.is_quiet());
            }

            /// Valid messages cut anywhere are followed exactly: quiet at
            /// the end once every chunk is acked, never malformed.
            #[test]
            fn valid_messages_cut_anywhere_are_followed(
                count in 1usize..8,
                cut in 1usize..40,
                value in any::<i64>(),
                note in ".{0,40}",
            ) {
                let mut follower = ForwardFollower::default();
                let mut stream = Vec::new();
                for n in 0..count {
                    let record = map(&[("n", Value::from(value)), ("note", text(&note))]);
                    let options = map(&[("chunk", text(&format!("id-{n}")))]);
                    stream.extend(encode(&Value::Array(vec![
                        text("tag"),
                        Value::from(n as u64),
                        record,
                        options,
                    ])));
                }
                for piece in stream.chunks(cut) {
                    follower.client_bytes(piece);
                }
                prop_assert!(!follower.is_malformed());
                prop_assert!(!follower.is_quiet());
                for n in 0..count {
                    follower.upstream_bytes(&ack(&format!("id-{n}")));
                }
                prop_assert!(follower.is_quiet());
            }
        }
    }
}
