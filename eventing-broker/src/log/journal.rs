//! The embedded log's journal: where appended events are made durable.
//!
//! A group commit writes its events here — one contiguous `O_DSYNC` write into a file whose
//! blocks are already allocated, on disk when it returns — and only then answers the appends. The events
//! are applied to the redb store as well, in a commit that is not synced; a synced store
//! commit (a checkpoint of the store, every few megabytes of journal, every second under
//! load, and with every cursor update) makes everything before it durable there, after which
//! the journal starts over. Opening the log replays what the journal holds beyond the store's
//! last synced commit. So an append costs one small sequential write and one flush of it,
//! instead of the store's commit (about nine page writes in different places of its file and a
//! flush of all of them); see docs/architecture.md for the measurements.
//!
//! Layout: a header block (`MAGIC`, the generation, a salt, a checksum), then records from
//! [`HEADER_BYTES`] on, each `[body length u32][RECORD_MAGIC u32][generation u64][xxh3 of the
//! body u64]` and a body of `[broker length u16][broker][first sequence u64][count u32]` and
//! per event `[length u32][bytes]`; every write ends with an empty record header (zeros),
//! which the next write overwrites, so a journal in order always ends at zeros. The checksum
//! is seeded with the salt — 64 random bits drawn whenever the journal starts over, kept only
//! in this file, which is its owner's alone — with the generation and with the record's
//! offset: event data a client sent, left in the file from an earlier generation, can never
//! pass for a record. Starting over writes a new generation and salt into the header and an
//! end at the first record's place. Reading stops at the first record that is not whole, not
//! checksummed right or not of the header's generation; anything but the zeros of an end is
//! damage (or a write torn by a power loss), and is reported.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Where records begin; the header takes the first block.
pub const HEADER_BYTES: u64 = 4096;
/// The journal file is kept at least this long, its blocks written once: overwriting
/// allocated blocks lets the flush write data alone, without a journal commit of the file
/// system (measured on this project's machines: 100 µs against 180 µs for an append).
pub const PREALLOCATED_BYTES: u64 = 8 << 20;
/// Past this many bytes of records the next round checkpoints the store and starts over, so
/// the journal stays inside its preallocated blocks and a replay stays short.
pub const CHECKPOINT_BYTES: u64 = 4 << 20;

const MAGIC: &[u8; 16] = b"mecha journal v1";
const RECORD_MAGIC: u32 = 0x4d4a_524e;
const RECORD_HEADER: usize = 24;
/// Magic, generation, salt, checksum.
const HEADER_LEN: usize = 40;
/// A record longer than this is not one (a damaged length): reading stops there.
const MAX_RECORD: u64 = 1 << 32;

/// One append as the journal holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub broker: String,
    pub first: u64,
    pub events: Vec<Vec<u8>>,
}

/// Why reading the journal stopped somewhere other than the zeros of an end: damage, or a
/// write torn by a power loss (which was never answered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    pub offset: u64,
    pub why: &'static str,
}

/// The open journal.
#[derive(Debug)]
pub struct Journal {
    file: File,
    /// The same file opened `O_DSYNC`: a write to it returns once its data is on disk, one
    /// system call where a write and an `fdatasync` take two (and measured 100 µs against
    /// 125 µs for the pair).
    synced: File,
    path: PathBuf,
    generation: u64,
    /// The secret that seeds the current generation's checksums.
    salt: u64,
    /// Whether [`Journal::open`] created it (there was no journal).
    created: bool,
    /// Where the next record goes.
    offset: u64,
    /// The records of one round, written at once.
    buf: Vec<u8>,
    /// For tests: the next start-over stops once its header is written, as when the flush
    /// after it fails (whether the header reached the disk is then unknown).
    pub(crate) fail_after_header: bool,
}

impl Journal {
    /// Opens the journal at `path`, creating it (readable by its owner only) with its blocks
    /// allocated. A file whose header is not a journal's is refused.
    pub fn open(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(io::Error::other(format!(
                "{} is a symbolic link; the journal must be a file of its own",
                path.display()
            )));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let len = file.metadata()?.len();
        let synced = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DSYNC)
            .open(path)?;
        let mut journal = Self {
            file,
            synced,
            path: path.to_path_buf(),
            generation: 0,
            salt: 0,
            created: false,
            offset: HEADER_BYTES,
            buf: Vec::new(),
            fail_after_header: false,
        };
        let mut header = [0u8; HEADER_LEN];
        let start = usize::try_from(len).map_or(HEADER_LEN, |len| len.min(HEADER_LEN));
        journal.file.read_exact_at(&mut header[..start], 0)?;
        if header.iter().all(|b| *b == 0) {
            // New, or its creation stopped before the header (a full disk, a kill): records
            // are only ever written behind a header, so it holds none. Its blocks first,
            // then its header, so that a journal with a header always has its full length.
            journal.created = true;
            journal.preallocate()?;
            journal.generation = 1;
            journal.salt = random()?;
            journal.write_header()?;
            return Ok(journal);
        }
        let damaged = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        if len < HEADER_BYTES {
            return Err(damaged(format!("it is cut short ({len} bytes)")));
        }
        (journal.generation, journal.salt) = parse_header(&header).ok_or_else(|| {
            damaged("it is not a Mecha event log journal, or its header is damaged".into())
        })?;
        if len < PREALLOCATED_BYTES {
            return Err(damaged(format!(
                "it is cut short ({len} of at least {PREALLOCATED_BYTES} bytes)"
            )));
        }
        Ok(journal)
    }

    /// Whether opening it created it: there was no journal.
    pub fn created(&self) -> bool {
        self.created
    }

    /// The generation its records are written in now.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of records written since the journal last started over.
    pub fn written(&self) -> u64 {
        self.offset - HEADER_BYTES
    }

    /// The records of the current generation, in order, and where and why reading stopped if
    /// it did before the end of the file.
    pub fn entries(&self) -> io::Result<(Vec<Entry>, Option<Stopped>)> {
        let len = self.file.metadata()?.len();
        let mut entries = Vec::new();
        let mut at = HEADER_BYTES;
        let mut body = Vec::new();
        loop {
            if at + RECORD_HEADER as u64 > len {
                return Ok((
                    entries,
                    Some(Stopped {
                        offset: at,
                        why: "the end of the file, without an end",
                    }),
                ));
            }
            let mut head = [0u8; RECORD_HEADER];
            self.file.read_exact_at(&mut head, at)?;
            if head.iter().all(|b| *b == 0) {
                return Ok((entries, None));
            }
            let body_len = u64::from(u32::from_le_bytes(word(&head[0..4])));
            let why = if u32::from_le_bytes(word(&head[4..8])) != RECORD_MAGIC {
                "not a record"
            } else if u64::from_le_bytes(long(&head[8..16])) != self.generation {
                "a record of another generation"
            } else if body_len > MAX_RECORD || at + RECORD_HEADER as u64 + body_len > len {
                "a record cut short"
            } else {
                body.resize(body_len as usize, 0);
                self.file
                    .read_exact_at(&mut body, at + RECORD_HEADER as u64)?;
                if xxh3_64_with_seed(&body, self.seed(at))
                    != u64::from_le_bytes(long(&head[16..24]))
                {
                    "a record whose checksum does not match"
                } else if let Some(entry) = decode(&body) {
                    entries.push(entry);
                    at += RECORD_HEADER as u64 + body_len;
                    continue;
                } else {
                    "a record whose body is malformed"
                }
            };
            return Ok((entries, Some(Stopped { offset: at, why })));
        }
    }

    /// Writes one round's appends (`(broker, first sequence, events)`) as records, on disk when
    /// this returns. On an error nothing counts as written: the next round writes over it.
    pub fn append<'a>(
        &mut self,
        entries: impl IntoIterator<Item = (&'a str, u64, &'a [Vec<u8>])>,
    ) -> io::Result<()> {
        self.buf.clear();
        for (broker, first, events) in entries {
            let start = self.buf.len();
            self.buf.extend_from_slice(&[0u8; RECORD_HEADER]);
            let broker_len = u16::try_from(broker.len())
                .map_err(|_| io::Error::other("a broker key longer than 65535 bytes"))?;
            self.buf.extend_from_slice(&broker_len.to_le_bytes());
            self.buf.extend_from_slice(broker.as_bytes());
            self.buf.extend_from_slice(&first.to_le_bytes());
            let count = u32::try_from(events.len())
                .map_err(|_| io::Error::other("more than 2^32 events in one append"))?;
            self.buf.extend_from_slice(&count.to_le_bytes());
            for event in events {
                let len = u32::try_from(event.len())
                    .map_err(|_| io::Error::other("an event larger than 4 GiB"))?;
                self.buf.extend_from_slice(&len.to_le_bytes());
                self.buf.extend_from_slice(event);
            }
            let body = start + RECORD_HEADER;
            let body_len = u32::try_from(self.buf.len() - body)
                .map_err(|_| io::Error::other("an append larger than 4 GiB"))?;
            let seed = self.seed(self.offset + start as u64);
            let hash = xxh3_64_with_seed(&self.buf[body..], seed);
            let head = &mut self.buf[start..body];
            head[0..4].copy_from_slice(&body_len.to_le_bytes());
            head[4..8].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
            head[8..16].copy_from_slice(&self.generation.to_le_bytes());
            head[16..24].copy_from_slice(&hash.to_le_bytes());
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let records = self.buf.len() as u64;
        // The end, overwritten by the next write.
        self.buf.extend_from_slice(&[0u8; RECORD_HEADER]);
        self.synced.write_all_at(&self.buf, self.offset)?;
        self.offset += records;
        if self.buf.capacity() > 4 << 20 {
            // One large round does not keep its buffer for good.
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Starts over once the store holds everything durably: a new generation, so that the
    /// records written so far are no longer read. A file grown past its preallocated length
    /// by a large round is cut back.
    ///
    /// The new header goes first: until it is on disk nothing changes (on an error the caller
    /// must not append before a later start-over succeeds — the header may or may not have
    /// reached the disk). Once it is, the earlier records are of another generation, and an
    /// end where the first record goes keeps them from being read as damage.
    pub fn start_over(&mut self) -> io::Result<()> {
        let (generation, salt) = (self.generation + 1, random()?);
        write_header(&self.file, generation, salt)?;
        if std::mem::take(&mut self.fail_after_header) {
            return Err(io::Error::other("injected failure after the new header"));
        }
        (self.generation, self.salt, self.offset) = (generation, salt, HEADER_BYTES);
        self.file
            .write_all_at(&[0u8; RECORD_HEADER], HEADER_BYTES)?;
        if self.file.metadata()?.len() > 2 * PREALLOCATED_BYTES {
            self.file.set_len(PREALLOCATED_BYTES)?;
            self.file.sync_all()?;
        }
        Ok(())
    }

    /// What seeds the checksum of the record at `offset`.
    fn seed(&self, offset: u64) -> u64 {
        self.salt ^ self.generation.rotate_left(32) ^ offset
    }

    fn write_header(&self) -> io::Result<()> {
        write_header(&self.file, self.generation, self.salt)
    }

    /// Writes zeros up to [`PREALLOCATED_BYTES`] once, so that later writes overwrite
    /// allocated blocks.
    fn preallocate(&self) -> io::Result<()> {
        let zeros = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < PREALLOCATED_BYTES {
            let n = (PREALLOCATED_BYTES - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        // The length is metadata: a full sync, once.
        self.file.sync_all()
    }
}

fn write_header(file: &File, generation: u64, salt: u64) -> io::Result<()> {
    let mut header = [0u8; HEADER_LEN];
    header[..16].copy_from_slice(MAGIC);
    header[16..24].copy_from_slice(&generation.to_le_bytes());
    header[24..32].copy_from_slice(&salt.to_le_bytes());
    let hash = xxh3_64_with_seed(&header[..32], 0);
    header[32..40].copy_from_slice(&hash.to_le_bytes());
    file.write_all_at(&header, 0)?;
    file.sync_data()
}

fn parse_header(header: &[u8; HEADER_LEN]) -> Option<(u64, u64)> {
    if &header[..16] != MAGIC {
        return None;
    }
    if xxh3_64_with_seed(&header[..32], 0) != u64::from_le_bytes(long(&header[32..40])) {
        return None;
    }
    Some((
        u64::from_le_bytes(long(&header[16..24])),
        u64::from_le_bytes(long(&header[24..32])),
    ))
}

/// 64 bits from the kernel's random source.
fn random() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    mecha_common::auth::random_bytes(&mut bytes)?;
    Ok(u64::from_le_bytes(bytes))
}

fn decode(body: &[u8]) -> Option<Entry> {
    let mut rest = body;
    let broker_len = u16::from_le_bytes(take(&mut rest, 2)?.try_into().ok()?) as usize;
    let broker = String::from_utf8(take(&mut rest, broker_len)?.to_vec()).ok()?;
    let first = u64::from_le_bytes(take(&mut rest, 8)?.try_into().ok()?);
    let count = u32::from_le_bytes(take(&mut rest, 4)?.try_into().ok()?) as usize;
    // Each event takes at least its length word: a count the body cannot hold is damage.
    if count > rest.len() / 4 {
        return None;
    }
    let mut events = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u32::from_le_bytes(take(&mut rest, 4)?.try_into().ok()?) as usize;
        events.push(take(&mut rest, len)?.to_vec());
    }
    rest.is_empty().then_some(Entry {
        broker,
        first,
        events,
    })
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if rest.len() < n {
        return None;
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Some(head)
}

fn word(bytes: &[u8]) -> [u8; 4] {
    bytes.try_into().unwrap_or_default()
}

fn long(bytes: &[u8]) -> [u8; 8] {
    bytes.try_into().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        crate::log::temp_file(&format!("journal-{name}"), "events.journal")
    }

    fn entry(broker: &str, first: u64, events: &[&[u8]]) -> Entry {
        Entry {
            broker: broker.into(),
            first,
            events: events.iter().map(|e| e.to_vec()).collect(),
        }
    }

    fn write(journal: &mut Journal, entries: &[Entry]) {
        journal
            .append(
                entries
                    .iter()
                    .map(|e| (e.broker.as_str(), e.first, e.events.as_slice())),
            )
            .expect("append");
    }

    #[test]
    fn records_read_back_after_reopening_and_starting_over_hides_them() {
        let path = temp("reopen");
        let mut journal = Journal::open(&path).expect("open");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").len(),
            PREALLOCATED_BYTES
        );
        let first = [
            entry("ns/a", 1, &[b"one", b""]),
            entry("ns/b", 7, &[&[0xff, 0x00, 0xc3]]),
        ];
        write(&mut journal, &first);
        write(&mut journal, &[entry("ns/a", 3, &["é🎉".as_bytes()])]);
        drop(journal);

        let mut journal = Journal::open(&path).expect("reopen");
        let (entries, stopped) = journal.entries().expect("read");
        assert_eq!(stopped, None);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[..2], first);
        assert_eq!(entries[2], entry("ns/a", 3, &["é🎉".as_bytes()]));

        journal.start_over().expect("start over");
        let (entries, stopped) = journal.entries().expect("read");
        assert_eq!((entries.len(), stopped), (0, None), "started over: empty");
        // As long as the first record before: the earlier generation's second lies right
        // behind it, whole, and is not read (the write's end comes first).
        let next = [
            entry("ns/a", 4, &[b"two", b""]),
            entry("ns/b", 8, &[&[1, 2, 3]]),
        ];
        write(&mut journal, &next);
        drop(journal);
        let journal = Journal::open(&path).expect("reopen");
        let (entries, stopped) = journal.entries().expect("read");
        assert_eq!(entries, next);
        assert_eq!(stopped, None);
    }

    /// A client's event data is written into the journal as it was sent, and stays there
    /// after the journal starts over. However well it imitates a record — the right magic,
    /// generation and layout, placed exactly where the next record ends — it is not read
    /// back: the checksum's seed is a secret of the file's.
    #[test]
    fn a_record_planted_in_event_data_is_never_read() {
        let path = temp("forged");
        let mut journal = Journal::open(&path).expect("open");
        let planted = entry("ns/a", 100, &[b"FORGED"]);
        // What the attacker can build: the record as this code would encode it, with every
        // seed it could guess.
        let forge = |generation: u64, seed: u64| {
            let mut body = Vec::new();
            body.extend_from_slice(&(planted.broker.len() as u16).to_le_bytes());
            body.extend_from_slice(planted.broker.as_bytes());
            body.extend_from_slice(&planted.first.to_le_bytes());
            body.extend_from_slice(&1u32.to_le_bytes());
            body.extend_from_slice(&6u32.to_le_bytes());
            body.extend_from_slice(b"FORGED");
            let mut record = Vec::new();
            record.extend_from_slice(&(body.len() as u32).to_le_bytes());
            record.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
            record.extend_from_slice(&generation.to_le_bytes());
            record.extend_from_slice(&xxh3_64_with_seed(&body, seed).to_le_bytes());
            record.extend_from_slice(&body);
            record
        };
        // An event carrying forged records for the next generation, at every offset the
        // next record could end on, with the guessable seeds.
        let mut data = Vec::new();
        for seed in [0, 1, 2, 2u64.rotate_left(32)] {
            data.extend_from_slice(&forge(2, seed));
        }
        write(&mut journal, &[entry("ns/a", 1, &[&data])]);
        journal.start_over().expect("start over");
        // A short record of the new generation over the start of the earlier one.
        write(&mut journal, &[entry("ns/a", 2, &[b"x"])]);
        let (entries, stopped) = journal.entries().expect("read");
        assert_eq!(entries, [entry("ns/a", 2, &[b"x"])]);
        assert_eq!(stopped, None);
        drop(journal);
        // Nor when the planted bytes sit exactly where reading continues.
        let journal = Journal::open(&path).expect("open");
        let forged = forge(journal.generation, 0);
        journal
            .file
            .write_all_at(&forged, HEADER_BYTES)
            .expect("plant");
        let (entries, stopped) = journal.entries().expect("read");
        assert!(entries.is_empty(), "{entries:?}");
        assert_eq!(
            stopped.map(|s| s.why),
            Some("a record whose checksum does not match")
        );
    }

    /// Creation stopped before the header (a full disk during the first start): no record
    /// was ever written, so the next start makes it anew instead of refusing it.
    #[test]
    fn a_journal_whose_creation_stopped_is_made_anew() {
        let path = temp("unfinished");
        for len in [0, 100, 4096, 4_169_728] {
            std::fs::write(&path, vec![0u8; len]).expect("write");
            let mut journal = Journal::open(&path).expect("made anew");
            assert!(journal.created());
            write(&mut journal, &[entry("ns/a", 1, &[b"x"])]);
            drop(journal);
            let journal = Journal::open(&path).expect("reopen");
            assert!(!journal.created());
            assert_eq!(journal.entries().expect("read").0.len(), 1);
        }
    }

    #[test]
    fn a_journal_cut_short_is_refused() {
        let path = temp("cut");
        let mut journal = Journal::open(&path).expect("open");
        write(&mut journal, &[entry("ns/a", 1, &[b"kept"])]);
        drop(journal);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        for len in [700_000, 2000] {
            file.set_len(len).expect("truncate");
            let error = Journal::open(&path).expect_err("refused");
            assert_eq!(error.kind(), io::ErrorKind::InvalidData);
            assert!(error.to_string().contains("cut short"), "{error}");
        }
    }

    #[test]
    fn a_torn_or_damaged_record_ends_what_is_read() {
        let path = temp("torn");
        let mut journal = Journal::open(&path).expect("open");
        write(&mut journal, &[entry("ns/a", 1, &[b"kept"])]);
        let kept_end = journal.offset;
        write(&mut journal, &[entry("ns/a", 2, &[&[7u8; 300]])]);
        let end = journal.offset;
        drop(journal);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        // Every way the second record can be damaged: each byte flipped in turn (sampled),
        // or the write cut off anywhere (the rest of its bytes zero).
        for at in (kept_end..end).step_by(7) {
            let mut byte = [0u8; 1];
            file.read_exact_at(&mut byte, at).expect("read");
            file.write_all_at(&[byte[0] ^ 0x5a], at).expect("flip");
            let (entries, _) = Journal::open(&path).expect("open").entries().expect("read");
            assert_eq!(entries, [entry("ns/a", 1, &[b"kept"])], "byte {at} flipped");
            file.write_all_at(&byte, at).expect("restore");
        }
        let whole = std::fs::read(&path).expect("read");
        for cut in (kept_end..end).step_by(13) {
            let zeros = vec![0u8; (end - cut) as usize];
            file.write_all_at(&zeros, cut).expect("cut");
            let (entries, _) = Journal::open(&path).expect("open").entries().expect("read");
            assert_eq!(entries, [entry("ns/a", 1, &[b"kept"])], "cut at {cut}");
            file.write_all_at(&whole[cut as usize..end as usize], cut)
                .expect("restore");
        }
        let (entries, _) = Journal::open(&path).expect("open").entries().expect("read");
        assert_eq!(entries.len(), 2, "restored");
    }

    #[test]
    fn a_file_that_is_not_a_journal_is_refused() {
        let path = temp("foreign");
        std::fs::write(&path, vec![b'x'; 8192]).expect("write");
        let error = Journal::open(&path).expect_err("refused");
        assert!(
            error.to_string().contains("not a Mecha event log journal"),
            "{error}"
        );
    }
}
