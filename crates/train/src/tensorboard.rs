//! TensorBoard event files (`output.tensorboard = true`): the run's scalars in the format
//! `tensorboard --logdir` reads, written natively so helix needs no Python to be watched.
//!
//! An event file is a sequence of TFRecords (length, masked CRC-32C of the length, the bytes,
//! their masked CRC-32C), each holding one `tensorflow.Event` protobuf. Only the few fields
//! helix writes are encoded here: `wall_time`, `step`, `file_version`, a `Summary` of
//! `simple_value` scalars or of one text (the run's config, for TensorBoard's Text tab) or of
//! the hparams plugin's session infos (hparams.rs), and a `SessionLog`.
//!
//! Each run starts one new file holding the file version, a `SessionLog START` at step 0 (a
//! TensorBoard already watching drops what it read before, as on TensorFlow's own restarts)
//! and the history a resumed run keeps (metrics.jsonl's kept lines, with their wall times),
//! written whole under a name TensorBoard does not read and then renamed; only then are
//! helix's earlier files removed. A kill at any point leaves either the old files or the new
//! one, never a partial history; each step is then appended as it is logged.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

mod hparams;
pub use hparams::{hparams_of, HParam, SessionStatus, SESSION_END_TAG, SESSION_START_TAG};

/// What a file name must contain for TensorBoard to read it as an event file.
const EVENT_FILE_MARK: &str = "events.out.tfevents.";
/// How helix's event files end, so it removes only its own.
const HELIX_SUFFIX: &str = ".helix";

/// `SessionLog.SessionStatus.START`.
const SESSION_START: u64 = 1;

// Field numbers of `tensorflow.Event` (tensorboard/compat/proto/event.proto).
const EVENT_WALL_TIME: u64 = 1;
const EVENT_STEP: u64 = 2;
const EVENT_FILE_VERSION: u64 = 3;
const EVENT_SUMMARY: u64 = 5;
const EVENT_SESSION_LOG: u64 = 7;
// ... of `Summary`, `Summary.Value` and `SessionLog`.
const SUMMARY_VALUE: u64 = 1;
const VALUE_TAG: u64 = 1;
const VALUE_SIMPLE_VALUE: u64 = 2;
const SESSION_LOG_STATUS: u64 = 1;
// ... of a text value: `Summary.Value.metadata` (`SummaryMetadata`: `plugin_data` with its
// `plugin_name`, and `data_class`) and `Summary.Value.tensor` (`TensorProto`: `dtype`, an
// empty `tensor_shape` for a scalar, `string_val`).
const VALUE_METADATA: u64 = 9;
const VALUE_TENSOR: u64 = 8;
const METADATA_PLUGIN_DATA: u64 = 1;
const PLUGIN_DATA_NAME: u64 = 1;
const PLUGIN_DATA_CONTENT: u64 = 2;
const METADATA_DATA_CLASS: u64 = 4;
const DATA_CLASS_TENSOR: u64 = 2;
const TENSOR_DTYPE: u64 = 1;
const TENSOR_SHAPE: u64 = 2;
const TENSOR_STRING_VAL: u64 = 8;
const DT_STRING: u64 = 7;

// Protobuf's wire types for the fields written here.
const WIRE_VARINT: u64 = 0;
const WIRE_FIXED64: u64 = 1;
const WIRE_BYTES: u64 = 2;
const WIRE_FIXED32: u64 = 5;

/// One step's scalars: its wall time (None: now), step, and `(tag, value)` pairs.
pub type StepScalars = (Option<f64>, u64, Vec<(&'static str, f64)>);

/// An event file being appended to, one flushed record at a time.
pub struct EventFile {
    pub path: PathBuf,
    file: File,
}

impl EventFile {
    /// Starts a new event file in `dir` (created if missing) holding `history`, then removes
    /// helix's other event files there, which it supersedes.
    pub fn create(dir: &Path, history: &[StepScalars]) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let host = crate::outputs::host_name();
        // Readers take a directory's files in name order: the time leads, to the microsecond,
        // so a run resumed within the same second still sorts after the one it follows.
        let path = dir.join(format!(
            "{EVENT_FILE_MARK}{}.{:06}.{}.{}{HELIX_SUFFIX}",
            now.as_secs(),
            now.subsec_micros(),
            if host.is_empty() { "localhost" } else { &host },
            std::process::id()
        ));
        let mut records = Vec::new();
        let mut version = event_header(unix_time(), 0);
        put_bytes(&mut version, EVENT_FILE_VERSION, b"brain.Event:2");
        records.extend(tf_record(&version));
        let mut start = event_header(unix_time(), 0);
        let mut log = Vec::new();
        put_varint_field(&mut log, SESSION_LOG_STATUS, SESSION_START);
        put_bytes(&mut start, EVENT_SESSION_LOG, &log);
        records.extend(tf_record(&start));
        for (wall_time, step, scalars) in history {
            records.extend(tf_record(&scalars_event(*wall_time, *step, scalars)));
        }
        // Whole, synced, under a name without "tfevents" (which TensorBoard would read), then
        // renamed into place.
        let pending = dir.join(format!(".pending-{}{HELIX_SUFFIX}", std::process::id()));
        (|| {
            let mut f = File::create(&pending)?;
            f.write_all(&records)?;
            f.sync_all()?;
            std::fs::rename(&pending, &path)
        })()
        .with_context(|| format!("cannot write {}", path.display()))?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        for old in helix_event_files(dir)? {
            if old != path {
                std::fs::remove_file(&old)
                    .with_context(|| format!("cannot remove {}", old.display()))?;
            }
        }
        Ok(Self { path, file })
    }

    /// Appends one event at `step` holding every `(tag, value)` as a scalar; `wall_time` in
    /// seconds since the Unix epoch (None: now).
    pub fn write_scalars(
        &mut self,
        wall_time: Option<f64>,
        step: u64,
        scalars: &[(&str, f64)],
    ) -> Result<()> {
        self.append(&scalars_event(wall_time, step, scalars))
    }

    /// Appends `text` (markdown) under `tag` at `step`, for TensorBoard's Text tab.
    pub fn write_text(&mut self, step: u64, tag: &str, text: &str) -> Result<()> {
        let mut tensor = Vec::new();
        put_varint_field(&mut tensor, TENSOR_DTYPE, DT_STRING);
        put_bytes(&mut tensor, TENSOR_SHAPE, &[]);
        put_bytes(&mut tensor, TENSOR_STRING_VAL, text.as_bytes());
        self.append_plugin_value(step, tag, ("text", &[]), &tensor)
    }

    /// Appends, at `step`, a summary value under `tag` holding `tensor` (a `TensorProto`),
    /// whose metadata names `plugin` and its `content` (left out when empty).
    fn append_plugin_value(
        &mut self,
        step: u64,
        tag: &str,
        (plugin, content): (&str, &[u8]),
        tensor: &[u8],
    ) -> Result<()> {
        let mut plugin_data = Vec::new();
        put_bytes(&mut plugin_data, PLUGIN_DATA_NAME, plugin.as_bytes());
        if !content.is_empty() {
            put_bytes(&mut plugin_data, PLUGIN_DATA_CONTENT, content);
        }
        let mut metadata = Vec::new();
        put_bytes(&mut metadata, METADATA_PLUGIN_DATA, &plugin_data);
        put_varint_field(&mut metadata, METADATA_DATA_CLASS, DATA_CLASS_TENSOR);
        let mut value = Vec::new();
        put_bytes(&mut value, VALUE_TAG, tag.as_bytes());
        put_bytes(&mut value, VALUE_METADATA, &metadata);
        put_bytes(&mut value, VALUE_TENSOR, tensor);
        let mut summary = Vec::new();
        put_bytes(&mut summary, SUMMARY_VALUE, &value);
        let mut event = event_header(unix_time(), step);
        put_bytes(&mut event, EVENT_SUMMARY, &summary);
        self.append(&event)
    }

    /// `event` as one record at the end of the file, flushed.
    fn append(&mut self, event: &[u8]) -> Result<()> {
        self.file
            .write_all(&tf_record(event))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// Seconds since the Unix epoch: the events' wall time, and metrics.jsonl's.
pub fn unix_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// The event files helix wrote in `dir`, in name order.
pub fn helix_event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(event_files(dir)?
        .into_iter()
        .filter(|p| is_helix(p))
        .collect())
}

/// The event files in `dir` that helix did not write (another tool's, which TensorBoard shows
/// in the same run), in name order.
pub fn foreign_event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(event_files(dir)?
        .into_iter()
        .filter(|p| !is_helix(p))
        .collect())
}

fn is_helix(path: &Path) -> bool {
    path.to_str().is_some_and(|p| p.ends_with(HELIX_SUFFIX))
}

/// Every event file in `dir`, in name order.
fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let list = || format!("cannot list {}", dir.display());
    for entry in std::fs::read_dir(dir).with_context(list)? {
        let path = entry.with_context(list)?.path();
        let is_events = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains("tfevents"));
        if is_events && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// An `Event` at `step` whose `Summary` holds each `(tag, value)` as a `simple_value`.
fn scalars_event(wall_time: Option<f64>, step: u64, scalars: &[(&str, f64)]) -> Vec<u8> {
    let mut summary = Vec::new();
    for (tag, value) in scalars {
        let mut v = Vec::new();
        put_bytes(&mut v, VALUE_TAG, tag.as_bytes());
        // simple_value is a float: TensorBoard shows f32 whatever the writer held.
        put_key(&mut v, VALUE_SIMPLE_VALUE, WIRE_FIXED32);
        v.extend_from_slice(&(*value as f32).to_le_bytes());
        put_bytes(&mut summary, SUMMARY_VALUE, &v);
    }
    let mut event = event_header(wall_time.unwrap_or_else(unix_time), step);
    put_bytes(&mut event, EVENT_SUMMARY, &summary);
    event
}

/// One event as [`read_events`] finds it: the fields helix writes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: u64,
    pub file_version: Option<String>,
    pub scalars: Vec<(String, f32)>,
    /// The other summary values: (tag, the plugin named in its metadata).
    pub plugin_values: Vec<(String, String)>,
    /// `SessionLog` status, where the event is one (1: START).
    pub session_status: Option<u64>,
}

/// The events of a file helix wrote, each record's checksums verified; a record cut short at
/// the end (a kill mid-write) ends the list, as it ends TensorBoard's reading.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut events = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 12 {
        let head = &bytes[at..at + 8];
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into()?);
        anyhow::ensure!(
            crc == masked_crc32c(head),
            "{}: the record at byte {at} has a bad length checksum",
            path.display()
        );
        let len = u64::from_le_bytes(head.try_into()?) as usize;
        let Some(end) = (at + 12).checked_add(len).filter(|e| *e < bytes.len() - 3) else {
            break;
        };
        let data = &bytes[at + 12..end];
        let crc = u32::from_le_bytes(bytes[end..end + 4].try_into()?);
        anyhow::ensure!(
            crc == masked_crc32c(data),
            "{}: the record at byte {at} has a bad data checksum",
            path.display()
        );
        events.push(
            parse_event(data)
                .with_context(|| format!("{}: record at byte {at}", path.display()))?,
        );
        at = end + 4;
    }
    Ok(events)
}

fn parse_event(data: &[u8]) -> Result<Event> {
    let mut e = Event::default();
    for (field, value) in fields(data)? {
        match (field, value) {
            (EVENT_WALL_TIME, Field::Fixed64(v)) => e.wall_time = f64::from_bits(v),
            (EVENT_STEP, Field::Varint(v)) => e.step = v,
            (EVENT_FILE_VERSION, Field::Bytes(b)) => {
                e.file_version = Some(String::from_utf8_lossy(b).into())
            }
            (EVENT_SUMMARY, Field::Bytes(summary)) => {
                for (f, value) in fields(summary)? {
                    let (SUMMARY_VALUE, Field::Bytes(value)) = (f, value) else {
                        continue;
                    };
                    let (mut tag, mut scalar, mut plugin) = (String::new(), None, None);
                    for (f, v) in fields(value)? {
                        match (f, v) {
                            (VALUE_TAG, Field::Bytes(b)) => tag = String::from_utf8_lossy(b).into(),
                            (VALUE_SIMPLE_VALUE, Field::Fixed32(bits)) => {
                                scalar = Some(f32::from_bits(bits))
                            }
                            (VALUE_METADATA, Field::Bytes(m)) => plugin = plugin_name(m)?,
                            _ => {}
                        }
                    }
                    match (scalar, plugin) {
                        (Some(s), _) => e.scalars.push((tag, s)),
                        (None, Some(p)) => e.plugin_values.push((tag, p)),
                        (None, None) => {}
                    }
                }
            }
            (EVENT_SESSION_LOG, Field::Bytes(log)) => {
                for (f, v) in fields(log)? {
                    if let (SESSION_LOG_STATUS, Field::Varint(status)) = (f, v) {
                        e.session_status = Some(status);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(e)
}

/// The plugin a `SummaryMetadata` names, if any.
fn plugin_name(metadata: &[u8]) -> Result<Option<String>> {
    for (f, v) in fields(metadata)? {
        if let (METADATA_PLUGIN_DATA, Field::Bytes(plugin)) = (f, v) {
            for (f, v) in fields(plugin)? {
                if let (PLUGIN_DATA_NAME, Field::Bytes(name)) = (f, v) {
                    return Ok(Some(String::from_utf8_lossy(name).into()));
                }
            }
        }
    }
    Ok(None)
}

/// A protobuf field's value, by wire type.
enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// The (field number, value) pairs of one protobuf message.
fn fields(mut data: &[u8]) -> Result<Vec<(u64, Field<'_>)>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let key = take_varint(&mut data)?;
        let value = match key & 7 {
            WIRE_VARINT => Field::Varint(take_varint(&mut data)?),
            WIRE_FIXED64 => Field::Fixed64(u64::from_le_bytes(take(&mut data, 8)?.try_into()?)),
            WIRE_BYTES => {
                let n = take_varint(&mut data)? as usize;
                Field::Bytes(take(&mut data, n)?)
            }
            WIRE_FIXED32 => Field::Fixed32(u32::from_le_bytes(take(&mut data, 4)?.try_into()?)),
            wire => anyhow::bail!("protobuf wire type {wire} is not one helix writes"),
        };
        out.push((key >> 3, value));
    }
    Ok(out)
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    anyhow::ensure!(n <= data.len(), "a protobuf field runs past its message");
    let (head, rest) = data.split_at(n);
    *data = rest;
    Ok(head)
}

fn take_varint(data: &mut &[u8]) -> Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = take(data, 1)?[0];
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Ok(v);
        }
    }
    anyhow::bail!("a protobuf varint longer than 10 bytes")
}

/// An `Event` with its wall time and step.
fn event_header(wall_time: f64, step: u64) -> Vec<u8> {
    let mut e = Vec::new();
    put_key(&mut e, EVENT_WALL_TIME, WIRE_FIXED64);
    e.extend_from_slice(&wall_time.to_le_bytes());
    put_varint_field(&mut e, EVENT_STEP, step);
    e
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, (field << 3) | wire);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
    put_key(out, field, WIRE_VARINT);
    put_varint(out, v);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(out, field, WIRE_BYTES);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `data` framed as one TFRecord.
fn tf_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    r
}

/// TFRecord's checksum: CRC-32C rotated and offset, so a CRC stored inside checked data does
/// not checksum to a fixed value.
fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: event records are a few
/// hundred bytes once per step.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & 0u32.wrapping_sub(crc & 1));
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_published_check_values() {
        // RFC 3720 B.4 and the CRC catalogue's check value for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&ascending), 0x46dd_794e);
    }

    #[test]
    fn varints_and_records_are_framed_as_protobuf_and_tfrecord_say() {
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        let r = tf_record(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
    }

    #[test]
    fn written_events_read_back_and_a_flipped_byte_is_named() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let mut f = EventFile::create(tmp.path(), &[(Some(1.6e9), 3, vec![("val/loss", 0.5)])])?;
        f.write_scalars(Some(1.7e9), 10, &[("train/loss", 2.25), ("train/lr", 1e-4)])?;
        let events = read_events(&f.path)?;
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(
            (events[1].step, events[1].session_status),
            (0, Some(SESSION_START))
        );
        assert_eq!(events[2].scalars, vec![("val/loss".to_string(), 0.5)]);
        assert_eq!((events[2].step, events[2].wall_time), (3, 1.6e9));
        let want = vec![("train/loss".to_string(), 2.25), ("train/lr".into(), 1e-4)];
        assert_eq!((events[3].step, &events[3].scalars), (10, &want));
        assert_eq!(events[3].wall_time, 1.7e9);

        // A record cut short ends the list; a changed byte inside one is an error.
        let bytes = std::fs::read(&f.path)?;
        std::fs::write(&f.path, &bytes[..bytes.len() - 3])?;
        assert_eq!(read_events(&f.path)?.len(), 3);
        let mut flipped = bytes.clone();
        let n = flipped.len();
        flipped[n - 10] ^= 1;
        std::fs::write(&f.path, &flipped)?;
        let err = format!("{:#}", read_events(&f.path).unwrap_err());
        assert!(err.contains("bad data checksum"), "{err}");
        Ok(())
    }

    #[test]
    fn a_new_file_supersedes_helix_files_and_leaves_other_tools_files() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("tb");
        let first = EventFile::create(&dir, &[])?;
        let foreign = dir.join("events.out.tfevents.1700000000.host.pytorch");
        std::fs::write(&foreign, b"")?;
        assert_eq!(helix_event_files(&dir)?, vec![first.path.clone()]);
        let second = EventFile::create(&dir, &[])?;
        assert!(second.path > first.path);
        assert_eq!(helix_event_files(&dir)?, vec![second.path]);
        assert!(foreign.exists());
        assert_eq!(foreign_event_files(&dir)?, vec![foreign]);
        // Nothing is left under the pending name.
        assert_eq!(std::fs::read_dir(&dir)?.count(), 2);
        Ok(())
    }
}
