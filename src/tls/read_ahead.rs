//! The transport under a TLS session, reading ahead.
//!
//! rustls asks its transport for at most 4 KiB per read (more only while a
//! record is incomplete, 4 KiB at a time), so a full 16 KiB record took five
//! read system calls. Reading up to [`READ_AHEAD`] at once serves those
//! small reads from memory: one system call for up to four records. The
//! buffer is held only while it has unread bytes, so an idle connection
//! holds none. Writes pass straight through, vectored, so several records
//! rustls has ready go out in one system call.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::buffer_pool::BufferPool;

/// Bytes read from the socket at once: four full TLS records.
const READ_AHEAD: usize = 64 * 1024;

/// Drained buffers kept per worker thread for the next read: a fresh one
/// would be allocated and zeroed for every read, even one that finds
/// nothing (keep-alive requests paid 30% more CPU for it).
const POOL_PER_THREAD: usize = 16;

thread_local! {
    static POOL: BufferPool = const { BufferPool::new(READ_AHEAD, POOL_PER_THREAD) };
}

fn take_buffer() -> Box<[u8]> {
    POOL.with(BufferPool::take)
}

fn give_back(buffer: Box<[u8]>) {
    POOL.with(|pool| pool.give_back(buffer));
}

pub struct ReadAhead<S> {
    inner: S,
    /// Bytes read and not yet handed out are `buf[start..end]`; `None`
    /// when there are none.
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: None,
            start: 0,
            end: 0,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Whether bytes read from the socket wait here to be handed out.
    pub fn holds_bytes(&self) -> bool {
        self.buf.is_some()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let buf = match &mut this.buf {
            Some(buf) => buf,
            // A reader asking for as much as a read-ahead goes to the socket.
            None if out.remaining() >= READ_AHEAD => {
                return Pin::new(&mut this.inner).poll_read(cx, out)
            }
            None => {
                let mut buf = take_buffer();
                let mut filling = ReadBuf::new(&mut buf);
                let polled = Pin::new(&mut this.inner).poll_read(cx, &mut filling);
                let filled = filling.filled().len();
                if !matches!(polled, Poll::Ready(Ok(()))) || filled == 0 {
                    // Nothing yet, an error, or the end of stream.
                    give_back(buf);
                    return polled;
                }
                (this.start, this.end) = (0, filled);
                this.buf.insert(buf)
            }
        };
        let taken = out.remaining().min(this.end - this.start);
        out.put_slice(&buf[this.start..this.start + taken]);
        this.start += taken;
        if this.start == this.end {
            if let Some(drained) = this.buf.take() {
                give_back(drained);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (ReadAhead<TcpStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let client = TcpStream::connect(address).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (ReadAhead::new(server), client)
    }

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order_and_the_end() {
        let (mut reader, mut writer) = pair().await;
        let sent: Vec<u8> = (0..200_000u32).map(|n| (n % 251) as u8).collect();
        let sending = sent.clone();
        let writing = tokio::spawn(async move {
            writer.write_all(&sending).await.expect("write");
            writer.shutdown().await.expect("shutdown");
        });
        let mut received = Vec::new();
        let mut chunk = [0; 4096];
        loop {
            let n = reader.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            received.extend_from_slice(&chunk[..n]);
            // Whatever was read ahead is held; nothing is once it is handed out.
            assert_eq!(reader.buf.is_some(), reader.start < reader.end);
        }
        writing.await.expect("writer");
        assert_eq!(received, sent);
        assert!(reader.buf.is_none(), "a drained reader holds no buffer");
    }

    #[tokio::test]
    async fn one_socket_read_serves_several_small_reads() {
        let (mut reader, mut writer) = pair().await;
        writer.write_all(&[7; 3 * 4096]).await.expect("write");
        let mut chunk = [0; 4096];
        // Wait for all of it to arrive, so the first read takes it all.
        let arrived = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while reader
                .get_ref()
                .peek(&mut [0; 3 * 4096])
                .await
                .expect("peek")
                < 3 * 4096
            {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        });
        arrived.await.expect("the bytes arrive");
        assert_eq!(reader.read(&mut chunk).await.expect("read"), 4096);
        assert_eq!(reader.end, 3 * 4096, "read ahead in one go");
        for _ in 0..2 {
            assert_eq!(reader.read(&mut chunk).await.expect("read"), 4096);
        }
        assert!(reader.buf.is_none());
    }

    #[tokio::test]
    async fn a_read_that_finds_nothing_holds_no_buffer_and_buffers_are_reused() {
        let (mut reader, mut writer) = pair().await;
        let mut chunk = [0; 4096];
        let polled = std::future::poll_fn(|cx| {
            let mut out = ReadBuf::new(&mut chunk);
            Poll::Ready(Pin::new(&mut reader).poll_read(cx, &mut out).is_pending())
        })
        .await;
        assert!(polled, "nothing was sent yet");
        assert!(reader.buf.is_none(), "a waiting reader holds no buffer");
        let pooled = POOL.with(BufferPool::next_taken);
        assert!(pooled.is_some(), "the buffer went back to the pool");
        writer.write_all(b"hello").await.expect("write");
        assert_eq!(reader.read(&mut chunk).await.expect("read"), 5);
        assert_eq!(&chunk[..5], b"hello");
        let again = POOL.with(BufferPool::next_taken);
        assert_eq!(
            again, pooled,
            "the same buffer served the read and came back"
        );
    }
}
