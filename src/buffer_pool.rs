//! Per-thread pools of fixed-size byte buffers. A buffer is taken while
//! bytes are in flight and given back once drained: an idle connection
//! holds none, and a busy thread does not allocate and zero one per read.

use std::cell::RefCell;

/// Drained buffers of one size, kept by one thread (a `thread_local!`).
pub struct BufferPool {
    size: usize,
    /// At most this many are kept; more given back are freed.
    keep: usize,
    buffers: RefCell<Vec<Box<[u8]>>>,
}

impl BufferPool {
    pub const fn new(size: usize, keep: usize) -> BufferPool {
        BufferPool {
            size,
            keep,
            buffers: RefCell::new(Vec::new()),
        }
    }

    /// A kept buffer, or a new zeroed one of the pool's size.
    pub fn take(&self) -> Box<[u8]> {
        self.buffers
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0; self.size].into_boxed_slice())
    }

    pub fn give_back(&self, buffer: Box<[u8]>) {
        let mut buffers = self.buffers.borrow_mut();
        if buffers.len() < self.keep {
            buffers.push(buffer);
        }
    }

    /// The buffer the next `take` returns, by address.
    #[cfg(test)]
    pub fn next_taken(&self) -> Option<*const u8> {
        self.buffers.borrow().last().map(|buffer| buffer.as_ptr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_up_to_the_bound() {
        let pool = BufferPool::new(1024, 2);
        let taken: Vec<_> = (0..3).map(|_| pool.take()).collect();
        assert!(taken.iter().all(|buffer| buffer.len() == 1024));
        let addresses: Vec<_> = taken.iter().map(|buffer| buffer.as_ptr()).collect();
        for buffer in taken {
            pool.give_back(buffer);
        }
        assert_eq!(pool.buffers.borrow().len(), 2, "the third was freed");
        assert_eq!(pool.next_taken(), Some(addresses[1]));
        let (second, first) = (pool.take(), pool.take());
        assert_eq!(second.as_ptr(), addresses[1]);
        assert_eq!(first.as_ptr(), addresses[0]);
        assert_eq!(pool.next_taken(), None);
    }
}
