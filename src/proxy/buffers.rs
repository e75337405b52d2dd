//! 16 KiB buffers pooled per worker thread: the splice relay copies small
//! messages through them, and the bytes a client sent before its peer was
//! connected are read into one (a [`Seed`]).

use crate::buffer_pool::BufferPool;

/// Bytes read per copy. A read that fills the whole buffer marks a bulk
/// transfer, which the splice relay then splices.
pub(super) const BUFFER_SIZE: usize = 16 * 1024;

/// Buffers kept per worker thread for the next connection with data.
const POOL_PER_THREAD: usize = 64;

thread_local! {
    static BUFFERS: BufferPool = const { BufferPool::new(BUFFER_SIZE, POOL_PER_THREAD) };
}

pub(super) fn take_buffer() -> Box<[u8]> {
    BUFFERS.with(BufferPool::take)
}

pub(super) fn give_back_buffer(buffer: Box<[u8]>) {
    BUFFERS.with(|pool| pool.give_back(buffer));
}

/// What the client had sent when sluice looked, before connecting its
/// peer: the relay writes it to the peer first (after any PROXY header).
pub struct Seed {
    /// A pooled buffer; the bytes are `buffer[..len]`.
    pub(super) buffer: Box<[u8]>,
    pub(super) len: usize,
}

impl Seed {
    pub(super) fn bytes(&self) -> &[u8] {
        &self.buffer[..self.len]
    }
}
