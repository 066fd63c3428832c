//! The file end of an attempt's log and transcript: buffers what the writer formats and, once
//! an attempt's output passes one buffer, hands full buffers to a thread of its own that hashes
//! and writes them, so that digest and `write(2)` run on the other core beside redaction.
//!
//! The queue is bounded ([`QUEUE`] buffers of [`CHUNK`] bytes): a slow disk makes the writer
//! wait instead of memory growing. [`Sink::flush`] and [`Sink::close`] return only once every
//! byte given before them is in the kernel, so a log's closing record, the idle flush and the
//! journal's `attempt_finished` keep the order they had with a plain `BufWriter` (the recorder
//! closes the files before it goes on). An attempt that prints less than one buffer never
//! starts the thread (no-op steps cost what they did).

use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use crate::fs::HashingFile;

/// Bytes gathered before they are handed on (one `write(2)` each).
const CHUNK: usize = 64 * 1024;

/// Full buffers that may wait for the thread: with the one being filled and the one being
/// written, at most `QUEUE + 2` buffers per file exist (a buffer is only made when none came
/// back for reuse, that is when all the others are queued or being written).
const QUEUE: usize = 2;

enum Msg {
    Data(Vec<u8>),
    /// Answer on the return channel once everything before has been written.
    Flush,
}

enum Back {
    /// A written buffer, for reuse.
    Free(Vec<u8>),
    Flushed,
}

struct Worker {
    tx: SyncSender<Msg>,
    back: Receiver<Back>,
    handle: JoinHandle<io::Result<HashingFile>>,
}

enum State {
    /// No thread yet: writes go straight to the file.
    Inline(HashingFile),
    Thread(Worker),
    /// After an error or [`Sink::close`].
    Gone,
}

pub(crate) struct Sink {
    buf: Vec<u8>,
    state: State,
}

impl Sink {
    pub(crate) fn new(file: HashingFile) -> Self {
        Self {
            buf: Vec::with_capacity(CHUNK),
            state: State::Inline(file),
        }
    }

    /// Hands the full buffer on: to the thread (started at the first full buffer), or to
    /// the file when it is not there yet.
    fn dispatch(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let State::Inline(_) = self.state {
            // Output larger than one buffer: from here on, the thread writes.
            let State::Inline(file) = std::mem::replace(&mut self.state, State::Gone) else {
                return Ok(());
            };
            self.state = State::Thread(spawn(file)?);
        }
        let State::Thread(worker) = &mut self.state else {
            return Err(gone());
        };
        let fresh = match worker.back.try_recv() {
            Ok(Back::Free(mut b)) => {
                b.clear();
                b
            }
            _ => Vec::with_capacity(CHUNK),
        };
        let full = std::mem::replace(&mut self.buf, fresh);
        if worker.tx.send(Msg::Data(full)).is_err() {
            return Err(self.fail());
        }
        Ok(())
    }

    /// The thread stopped (a write failed): its error.
    fn fail(&mut self) -> io::Error {
        match std::mem::replace(&mut self.state, State::Gone) {
            State::Thread(worker) => worker.finish().err().unwrap_or_else(gone),
            _ => gone(),
        }
    }

    /// Writes what is buffered and waits until the thread has written everything: the file
    /// then holds every byte given so far.
    fn drain(&mut self) -> io::Result<()> {
        match &mut self.state {
            State::Inline(file) => {
                file.write_all(&self.buf)?;
                self.buf.clear();
                Ok(())
            }
            State::Thread(_) => {
                self.dispatch()?;
                let State::Thread(worker) = &mut self.state else {
                    return Err(gone());
                };
                if worker.tx.send(Msg::Flush).is_err() {
                    return Err(self.fail());
                }
                loop {
                    let State::Thread(worker) = &mut self.state else {
                        return Err(gone());
                    };
                    match worker.back.recv() {
                        Ok(Back::Flushed) => return Ok(()),
                        Ok(Back::Free(_)) => {}
                        Err(_) => return Err(self.fail()),
                    }
                }
            }
            State::Gone => Err(gone()),
        }
    }

    /// Writes everything, stops the thread and gives the file back (with its running digest).
    pub(crate) fn close(mut self) -> io::Result<HashingFile> {
        self.drain()?;
        match std::mem::replace(&mut self.state, State::Gone) {
            State::Inline(file) => Ok(file),
            State::Thread(worker) => worker.finish(),
            State::Gone => Err(gone()),
        }
    }
}

impl Worker {
    /// Ends the queue and waits for the thread: the file with everything written, or the
    /// write error that stopped it.
    fn finish(self) -> io::Result<HashingFile> {
        drop(self.tx);
        self.handle
            .join()
            .map_err(|_| io::Error::other("the evidence writer thread panicked"))?
    }
}

fn gone() -> io::Error {
    io::Error::other("the evidence file was already closed after an error")
}

fn spawn(mut file: HashingFile) -> io::Result<Worker> {
    let (tx, rx) = mpsc::sync_channel::<Msg>(QUEUE);
    // Bounded too, and made here: the thread never allocates (no allocator arena of its own).
    // It holds at most every buffer (`QUEUE + 2`) and one flush answer, so it never blocks.
    let (back_tx, back) = mpsc::sync_channel::<Back>(QUEUE + 3);
    let handle = std::thread::Builder::new()
        .name("evidence-writer".into())
        .spawn(move || {
            for msg in rx {
                match msg {
                    Msg::Data(b) => {
                        file.write_all(&b)?;
                        // The owner may be gone (closing after an error): nothing to return to.
                        let _ = back_tx.send(Back::Free(b));
                    }
                    Msg::Flush => {
                        let _ = back_tx.send(Back::Flushed);
                    }
                }
            }
            Ok(file)
        })?;
    Ok(Worker { tx, back, handle })
}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_all(data).map(|()| data.len())
    }

    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let room = CHUNK - self.buf.len().min(CHUNK);
            let (now, rest) = data.split_at(room.min(data.len()));
            self.buf.extend_from_slice(now);
            data = rest;
            if self.buf.len() >= CHUNK {
                self.dispatch()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.drain()
    }
}

impl Drop for Sink {
    /// Dropped without [`Sink::close`] (an error elsewhere, a rewrite that replaces the file):
    /// what was given is still written, and the thread ends before the file is reused.
    fn drop(&mut self) {
        if !matches!(self.state, State::Gone) {
            let _ = self.drain();
        }
        if let State::Thread(worker) = std::mem::replace(&mut self.state, State::Gone) {
            let _ = worker.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink on a new file `f` in a temporary directory (kept alive by the caller).
    fn sink_in_temp_dir() -> (tempfile::TempDir, std::path::PathBuf, Sink) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).expect("create");
        (dir, path, Sink::new(HashingFile::new(file)))
    }

    /// Bytes written through the thread in odd-sized pieces land in order, the running digest
    /// is the file's, and a flush means the file already holds them.
    #[test]
    fn the_thread_writes_every_byte_in_order_and_flush_waits_for_it() {
        let (_dir, path, mut sink) = sink_in_temp_dir();
        let mut want = Vec::new();
        for i in 0..40_000u32 {
            let piece = format!("line {i} {}\n", "x".repeat((i % 97) as usize));
            sink.write_all(piece.as_bytes()).expect("write");
            want.extend_from_slice(piece.as_bytes());
            if i == 20_000 {
                sink.flush().expect("flush");
                assert_eq!(std::fs::read(&path).expect("read"), want);
            }
        }
        assert!(matches!(sink.state, State::Thread(_)), "thread started");
        let digest = sink.close().expect("close").digest().expect("digest");
        assert_eq!(std::fs::read(&path).expect("read"), want);
        assert_eq!(digest, crate::checksums::sha256_file(&path).expect("hash"));
    }

    /// Less than one buffer: no thread, and the bytes are in the file after a flush.
    #[test]
    fn small_output_is_written_without_a_thread() {
        let (_dir, path, mut sink) = sink_in_temp_dir();
        sink.write_all(b"one record\n").expect("write");
        sink.flush().expect("flush");
        assert_eq!(std::fs::read(&path).expect("read"), b"one record\n");
        assert!(matches!(sink.state, State::Inline(_)));
        drop(sink);
    }

    /// A write that fails on the thread (a full file system) is reported to the writer, not
    /// lost: at a later write, the flush or the close.
    #[test]
    fn a_failed_write_on_the_thread_is_reported() {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let mut sink = Sink::new(HashingFile::new(file));
        let chunk = vec![b'a'; CHUNK];
        let mut failed = false;
        for _ in 0..(QUEUE + 8) {
            if sink.write_all(&chunk).is_err() {
                failed = true;
                break;
            }
        }
        if !failed {
            failed = sink.flush().is_err();
        }
        assert!(failed, "the error reached the writer");
    }
}
