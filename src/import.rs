//! `tickfan import`: bulk-loads historical ticks from CSV (header row naming the tick fields) or
//! NDJSON into the store of a server that is not running. Rows go through the same validation,
//! de-duplication and quality scoring as live ingest (except the stale-timestamp rule), get the
//! next per-symbol seqs, and are appended in large batches. Progress per file is recorded in the
//! store after each batch, so an interrupted import rerun with the same file continues where it
//! stopped. De-duplication uses the live rules (`id`, or ts/price/volume without one) but
//! against every tick the store holds for the symbol, not only a recent window: rows replayed
//! after a crash between a batch and its progress record, or the same rows from a copied or
//! touched file (a new resume key), are counted as duplicates rather than stored twice. That
//! costs one read of a symbol's stored ticks the first time the import sees it, and about
//! 16 bytes of memory per stored tick of each symbol imported (bounded by
//! `store.max_ticks_per_symbol`). NDJSON lines pass the `limits.max_json_depth` check first.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Config;
use crate::dlq::DeadLetter;
use crate::ingest::dedup;
use crate::ingest::parse::{parse_document, CsvColumns, Element, TickObject};
use crate::ingest::validate::{validate, RejectCode, TimeRules};
use crate::ingest::{SymbolIngest, SymbolStates};
use crate::store::{Store, StoreError, StoredTick};
use crate::tick::{now_ms, now_us, Symbol, Tick};

/// Ticks appended per batch (one progress record each).
const BATCH: usize = 16_384;

/// Importing failed before or while reading.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The store could not be opened or written.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Counts of an import.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// Ticks stored.
    pub accepted: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Rows rejected, by code.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Rows skipped because an earlier run already imported them.
    pub resumed: u64,
    /// Files that could not be read.
    pub failed_files: Vec<String>,
}

impl ImportSummary {
    /// Rejected rows over all codes.
    #[must_use]
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// Everything `tickfan import` prints at the end, in order: what a re-run skipped, the
    /// rejections by code, and last the contract's summary line (scripts read the last line).
    /// Skipped rows are "read by an earlier run", not "imported": that run may have rejected
    /// them.
    #[must_use]
    pub fn report_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if self.resumed > 0 {
            lines.push(format!(
                "resumed: skipped {} rows already read by an earlier run",
                self.resumed
            ));
        }
        if !self.rejected.is_empty() {
            let by_code: Vec<String> = self
                .rejected
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect();
            lines.push(format!("rejected by code: {}", by_code.join(", ")));
        }
        lines.push(self.line());
        lines
    }

    /// The contract's summary line.
    #[must_use]
    pub fn line(&self) -> String {
        format!(
            "imported {} accepted, {} duplicates, {} rejected",
            self.accepted,
            self.duplicates,
            self.rejected_total()
        )
    }
}

/// Imports `files` into the store of `config`, reporting progress on stderr.
///
/// # Errors
/// The store cannot be opened (for example because a server holds it) or written. Files that
/// cannot be read are listed in the summary instead, so the others still import.
pub fn run(
    config: &Config,
    files: &[PathBuf],
    show_progress: bool,
) -> Result<ImportSummary, ImportError> {
    let (store, recovery) = Store::open(&config.store)?;
    let mut importer = Importer {
        config,
        store: &store,
        symbols: SymbolStates::default(),
        keys: HashMap::new(),
        last_seq: recovery
            .symbols
            .into_iter()
            .map(|s| (s.symbol, s.seq))
            .collect(),
        summary: ImportSummary::default(),
        batch: Vec::with_capacity(BATCH),
        dead: Vec::new(),
        rules: TimeRules {
            now_ms: now_ms(),
            max_future_ms: config.validation.max_future_ms,
            max_age_ms: None,
        },
    };
    for path in files {
        if let Err(e) = importer.file(path, show_progress) {
            match e {
                ImportError::Read { .. } => {
                    eprintln!("tickfan import: {e}");
                    importer
                        .summary
                        .failed_files
                        .push(path.display().to_string());
                }
                other => return Err(other),
            }
        }
    }
    store.flush_blocking()?;
    store.close()?;
    Ok(importer.summary)
}

struct Importer<'c> {
    config: &'c Config,
    store: &'c Store,
    symbols: SymbolStates,
    /// Dedup keys of every stored tick of each symbol seen, plus those imported since.
    keys: HashMap<Symbol, HashSet<u64, ahash::RandomState>>,
    last_seq: HashMap<Symbol, u64>,
    summary: ImportSummary,
    batch: Vec<StoredTick>,
    dead: Vec<DeadLetter>,
    rules: TimeRules,
}

enum Format {
    Csv,
    Ndjson,
}

impl Importer<'_> {
    fn file(&mut self, path: &Path, show_progress: bool) -> Result<(), ImportError> {
        let read_err = |reason: String| ImportError::Read {
            path: path.to_owned(),
            reason,
        };
        let format = match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("csv") => Format::Csv,
            Some("ndjson" | "jsonl") => Format::Ndjson,
            _ => {
                return Err(read_err(
                    "unknown format: use .csv, .ndjson or .jsonl".into(),
                ))
            }
        };
        let file = File::open(path).map_err(|e| read_err(e.to_string()))?;
        let meta = file.metadata().map_err(|e| read_err(e.to_string()))?;
        let key = resume_key(path, &meta);
        let done = self.store.import_progress(&key)?;
        let bar = progress_bar(path, meta.len(), show_progress);
        let mut row = 0u64;
        match format {
            Format::Csv => {
                let mut reader = csv::ReaderBuilder::new()
                    .flexible(true)
                    .from_reader(BufReader::with_capacity(1 << 20, file));
                let headers = reader
                    .headers()
                    .map_err(|e| read_err(e.to_string()))?
                    .clone();
                let columns = CsvColumns::new(&headers);
                let missing = columns.missing_required();
                if !missing.is_empty() {
                    return Err(read_err(format!(
                        "header row lacks required columns: {}",
                        missing.join(", ")
                    )));
                }
                let mut record = csv::StringRecord::new();
                loop {
                    match reader.read_record(&mut record) {
                        Ok(false) => break,
                        Ok(true) => {
                            row += 1;
                            if row <= done {
                                self.summary.resumed += 1;
                                continue;
                            }
                            self.outcome(csv_row(&columns, &record, self.rules))?;
                        }
                        Err(e) if e.is_io_error() => return Err(read_err(e.to_string())),
                        Err(e) => {
                            row += 1;
                            if row > done {
                                self.reject(
                                    RejectCode::BadJson,
                                    format!("malformed CSV row: {e}"),
                                    String::new(),
                                );
                            }
                        }
                    }
                    if self.batch.len() >= BATCH {
                        self.commit(&key, row)?;
                        bar.set_position(reader.position().byte());
                    }
                }
            }
            Format::Ndjson => {
                let mut reader = BufReader::with_capacity(1 << 20, file);
                let mut line = Vec::new();
                let mut bytes = 0u64;
                loop {
                    line.clear();
                    let n = reader
                        .read_until(b'\n', &mut line)
                        .map_err(|e| read_err(e.to_string()))?;
                    if n == 0 {
                        break;
                    }
                    bytes += n as u64;
                    if line.trim_ascii().is_empty() {
                        continue;
                    }
                    row += 1;
                    if row <= done {
                        self.summary.resumed += 1;
                        continue;
                    }
                    self.json_line(&line)?;
                    if self.batch.len() >= BATCH {
                        self.commit(&key, row)?;
                        bar.set_position(bytes);
                    }
                }
            }
        }
        self.commit(&key, row)?;
        bar.finish_and_clear();
        Ok(())
    }

    fn json_line(&mut self, line: &[u8]) -> Result<(), ImportError> {
        let mut rows = Vec::new();
        ndjson_line(line, self.rules, self.config.limits.max_json_depth, |r| {
            rows.push(r);
        });
        for row in rows {
            self.outcome(row)?;
        }
        Ok(())
    }

    fn outcome(&mut self, row: Row) -> Result<(), ImportError> {
        match row {
            Ok(tick) => self.admit(tick),
            Err(bad) => {
                self.reject(bad.code, bad.message, bad.raw);
                Ok(())
            }
        }
    }

    fn admit(&mut self, mut tick: Tick) -> Result<(), ImportError> {
        if !self.symbols.contains_key(&tick.symbol) {
            if self.symbols.len() >= self.config.validation.max_total_symbols {
                let msg = "symbol limit reached (validation.max_total_symbols)".to_owned();
                self.reject(RejectCode::InvalidSymbol, msg, tick.to_json());
                return Ok(());
            }
            let seeded = SymbolIngest::from_store(
                self.store,
                &tick.symbol,
                self.config.validation.dedup_window,
            );
            self.symbols.insert(tick.symbol.clone(), seeded);
            let mut stored = HashSet::with_hasher(ahash::RandomState::new());
            self.store.for_each_tick(tick.symbol.as_str(), |t| {
                stored.insert(dedup::key_of(t));
            })?;
            self.keys.insert(tick.symbol.clone(), stored);
        }
        let window = self.config.validation.dedup_window;
        let state = self
            .symbols
            .get_mut(&tick.symbol)
            .unwrap_or_else(|| unreachable!("inserted above"));
        let keys = self
            .keys
            .get_mut(&tick.symbol)
            .unwrap_or_else(|| unreachable!("inserted above"));
        // The window check scores quality; the key set catches what fell out of the window.
        let Some(key) = state.check(&mut tick).filter(|key| keys.insert(*key)) else {
            self.summary.duplicates += 1;
            return Ok(());
        };
        state.commit(key, &tick, window);
        let seq = self.last_seq.entry(tick.symbol.clone()).or_insert(0);
        *seq += 1;
        tick.seq = *seq;
        self.summary.accepted += 1;
        self.batch.push(StoredTick::new(tick, None));
        Ok(())
    }

    fn reject(&mut self, code: RejectCode, message: String, raw: String) {
        *self.summary.rejected.entry(code.as_str()).or_default() += 1;
        if self.dead.len() < self.config.store.dlq_capacity {
            self.dead
                .push(DeadLetter::new(code.as_str(), message, raw, now_ms()));
        }
    }

    /// Appends the batch and records progress behind it (the writer keeps the order).
    fn commit(&mut self, key: &str, rows: u64) -> Result<(), ImportError> {
        if !self.dead.is_empty() {
            self.store.push_dead_letters(std::mem::take(&mut self.dead));
        }
        if !self.batch.is_empty() {
            self.store.append_blocking(std::mem::replace(
                &mut self.batch,
                Vec::with_capacity(BATCH),
            ))?;
        }
        self.store.set_import_progress(key, rows)?;
        Ok(())
    }
}

/// One import row after parsing and validation: a tick, or why not.
pub type Row = Result<Tick, BadRow>;

/// A row that is not a valid tick.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    /// Reject code.
    pub code: RejectCode,
    /// Human message.
    pub message: String,
    /// The row's text, for the dead-letter list.
    pub raw: String,
}

/// Parses and validates one NDJSON line (one tick object, or an array of them), nested at most
/// `max_depth` levels, calling `out` with each tick's outcome in order.
pub fn ndjson_line(line: &[u8], rules: TimeRules, max_depth: usize, mut out: impl FnMut(Row)) {
    let bad = |code, message, raw| BadRow { code, message, raw };
    let Ok(text) = std::str::from_utf8(line) else {
        out(Err(bad(
            RejectCode::BadJson,
            "not valid UTF-8".into(),
            String::from_utf8_lossy(line).into_owned(),
        )));
        return;
    };
    let mut scratch = line.to_vec();
    match parse_document(&mut scratch, text, max_depth) {
        Ok(parsed) => parsed.for_each_element(|e| {
            out(match e {
                Element::Object(o) => {
                    validate(&o, rules, now_us()).map_err(|r| bad(r.code, r.message, o.to_text()))
                }
                Element::NotObject(raw) => Err(bad(
                    RejectCode::BadJson,
                    "a tick must be a JSON object".into(),
                    raw,
                )),
            });
        }),
        Err(e) => out(Err(bad(
            RejectCode::BadJson,
            e.to_string(),
            text.trim_end().to_owned(),
        ))),
    };
}

/// Validates one CSV record read through its file's header map.
pub fn csv_row(columns: &CsvColumns, record: &csv::StringRecord, rules: TimeRules) -> Row {
    let obj = TickObject::Csv(columns, record);
    validate(&obj, rules, now_us()).map_err(|r| BadRow {
        code: r.code,
        message: r.message,
        raw: obj.to_text(),
    })
}

/// Identifies "the same file" across runs: its path, size and modification time.
fn resume_key(path: &Path, meta: &std::fs::Metadata) -> String {
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{}|{}|{}", canonical.display(), meta.len(), mtime)
}

fn progress_bar(path: &Path, len: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40.cyan/blue}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(path.display().to_string());
    bar
}
