//! Why an image cannot be opened, read, created or written. [`ImageError`] always names the
//! file; [`FormatError`] says what is wrong inside it — which structure, field, entry and
//! offset — and [`CreateError`] why an image cannot be made as asked. Through a
//! [`BlockDevice`](diskferry_blockdev::BlockDevice), an image's errors travel as
//! [`BlockError::Format`] with the [`ImageError`] as its source.

use std::fmt;
use std::path::PathBuf;

use diskferry_blockdev::BlockError;
use diskferry_layout::Guid;

pub use crate::vhdx::log::LogError;

/// Why an image cannot be opened, read, created or written. Always names the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file is not a valid image of its format.
    #[error("{path}: {problem}")]
    Invalid {
        path: PathBuf,
        #[source]
        problem: FormatError,
    },
    /// A container diskferry recognises but cannot read.
    #[error("{path} is a {format} image, which diskferry cannot read yet")]
    Foreign {
        path: PathBuf,
        format: crate::Foreign,
    },
    /// A valid image that uses something diskferry does not implement.
    #[error("{path}: {feature} is not supported")]
    Unsupported { path: PathBuf, feature: String },
    /// An image cannot be created as asked.
    #[error("{path}: cannot create the image: {reason}")]
    Create {
        path: PathBuf,
        #[source]
        reason: CreateError,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: BlockError },
}

/// What is wrong inside an image file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file does not start with the format's identifier.
    #[error("not a {format} image (no {magic} identifier at the start)")]
    NotFormat {
        format: &'static str,
        magic: &'static str,
    },
    /// A structure is shorter than its format requires.
    #[error("{structure} cut short at {len} bytes (needs {needed})")]
    Short {
        structure: &'static str,
        len: u64,
        needed: u64,
    },
    /// A structure reaches past the end of the file.
    #[error("{structure} at {offset} ({len} bytes) is beyond the end of the file")]
    BeyondEnd {
        structure: &'static str,
        offset: u64,
        len: u64,
    },
    /// A structure or cluster the image points at is misaligned or outside the file.
    #[error("{structure}{} at {offset} is misaligned or outside the file", numbered(*index))]
    Misplaced {
        structure: &'static str,
        index: Option<u64>,
        offset: u64,
    },
    /// Both copies of a duplicated structure fail their signature or checksum.
    #[error("neither {structure} is valid (bad signature or checksum)")]
    NoValidCopy { structure: &'static str },
    /// A field holds a value the format (or a bound against hostile images) does not allow.
    #[error("{structure} {field} {value} is {allowed}")]
    Field {
        structure: &'static str,
        field: &'static str,
        value: u64,
        allowed: Allowed,
    },
    /// A table entry with bits the format reserves. For L2 tables the index counts virtual
    /// clusters from the start of the disk.
    #[error("{table} entry {index} has reserved bits set ({value:#x})")]
    ReservedBits {
        table: &'static str,
        index: u64,
        value: u64,
    },
    /// A VHDX BAT entry whose state the format does not define.
    #[error("BAT entry of block {block} has unknown state {state}")]
    UnknownBlockState { block: u64, state: u64 },
    /// A table claims more entries than fit or than diskferry accepts.
    #[error("{structure} claims {count} entries (at most {max})")]
    TooManyEntries {
        structure: &'static str,
        count: u64,
        max: u64,
    },
    /// A structure the image needs is absent.
    #[error("{structure} has no {item}")]
    Missing {
        structure: &'static str,
        item: &'static str,
    },
    /// A region or item marked required that this reader does not know.
    #[error("{structure} entry {index} is required but unknown ({id})")]
    UnknownRequired {
        structure: &'static str,
        index: u64,
        id: Guid,
    },
    /// The VHDX log cannot be replayed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A qcow2 compressed cluster whose data is damaged.
    #[error("compressed cluster at {offset} does not decompress to one cluster")]
    Compressed { offset: u64 },
    /// A cluster in use whose refcount says nobody uses it.
    #[error("cluster at {offset} is referenced but has refcount 0")]
    RefcountZero { offset: u64 },
    /// Append-only allocation reached the end of what the refcount table covers.
    #[error("the image outgrew its refcount table; convert it to a new image")]
    RefcountTableFull,
    #[error("the image is marked corrupt; repair it with `qemu-img check -r all`")]
    MarkedCorrupt,
    #[error("the image was not closed cleanly; run `qemu-img check -r all` first")]
    NotClean,
    #[error("the backing file name is not UTF-8")]
    BackingNameNotUtf8,
    #[error("a backing image was given but this image has no backing file")]
    NotAnOverlay,
    /// An overlay opened without its backing image cannot read what it does not hold.
    #[error("an overlay of {name:?} opened without it cannot read offset {offset}")]
    NoBacking { name: String, offset: u64 },
    #[error("backing chain is longer than {max} images (a loop?)")]
    BackingChainTooLong { max: u32 },
    /// A mapping of no bytes (a bug in a format's map function, not in the file).
    #[error("empty mapping at virtual offset {offset}")]
    EmptyMapping { offset: u64 },
}

/// What a field may hold, for [`FormatError::Field`] and [`CreateError::Parameter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// An inclusive range.
    Range {
        min: u64,
        max: u64,
    },
    /// A bound diskferry sets against hostile or broken images.
    Limit(u64),
    /// A power of two in an inclusive range.
    PowerOfTwo {
        min: u64,
        max: u64,
    },
    OneOf(&'static [u64]),
    MultipleOf(u64),
}

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allowed::Range { min, max } => write!(f, "outside {min}..={max}"),
            Allowed::Limit(max) => write!(f, "absurd (at most {max} is accepted)"),
            Allowed::PowerOfTwo { min, max } => {
                write!(f, "not a power of two in {min}..={max}")
            }
            Allowed::OneOf(values) => {
                let list: Vec<String> = values.iter().map(u64::to_string).collect();
                write!(f, "not one of {}", list.join(", "))
            }
            Allowed::MultipleOf(n) => write!(f, "not a multiple of {n}"),
        }
    }
}

impl Allowed {
    /// Whether `value` is allowed.
    pub fn admits(&self, value: u64) -> bool {
        match *self {
            Allowed::Range { min, max } => (min..=max).contains(&value),
            Allowed::Limit(max) => value <= max,
            Allowed::PowerOfTwo { min, max } => {
                value.is_power_of_two() && (min..=max).contains(&value)
            }
            Allowed::OneOf(values) => values.contains(&value),
            Allowed::MultipleOf(n) => n != 0 && value.is_multiple_of(n),
        }
    }
}

/// Why an image cannot be created as asked.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("the file to create the image in is not empty")]
    NotEmpty,
    #[error("{field} {value} is {allowed}")]
    Parameter {
        field: &'static str,
        value: u64,
        allowed: Allowed,
    },
    #[error("the backing file name must be 1 to 1023 bytes, not {len}")]
    BackingNameLength { len: usize },
    #[error("the backing file's path is not UTF-8 and cannot be stored in a qcow2 header")]
    BackingPathNotUtf8,
    #[error("the header with its backing file name ({len} bytes) does not fit one cluster")]
    HeaderTooLong { len: u64 },
    #[error("no random source for the image's GUIDs: {0}")]
    Random(getrandom::Error),
}

/// " N" for a numbered structure.
fn numbered(index: Option<u64>) -> String {
    index.map(|i| format!(" {i}")).unwrap_or_default()
}

impl From<ImageError> for BlockError {
    /// I/O errors stay what they were; anything about the image becomes
    /// [`BlockError::Format`] with the [`ImageError`] as its source.
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::Io { source, .. } => source,
            other => BlockError::Format(Box::new(other)),
        }
    }
}

/// Checks `value` of `field` in `structure` against `allowed`.
pub(crate) fn check_field(
    structure: &'static str,
    field: &'static str,
    value: u64,
    allowed: Allowed,
) -> Result<(), FormatError> {
    if allowed.admits(value) {
        Ok(())
    } else {
        Err(FormatError::Field {
            structure,
            field,
            value,
            allowed,
        })
    }
}

/// Checks a creation parameter against `allowed`.
pub(crate) fn check_parameter(
    field: &'static str,
    value: u64,
    allowed: Allowed,
) -> Result<(), CreateError> {
    if allowed.admits(value) {
        Ok(())
    } else {
        Err(CreateError::Parameter {
            field,
            value,
            allowed,
        })
    }
}

/// Attaches a file name to what is wrong with it.
pub(crate) trait AtPath<T> {
    fn at(self, path: &std::path::Path) -> Result<T, ImageError>;
}

impl<T> AtPath<T> for Result<T, FormatError> {
    fn at(self, path: &std::path::Path) -> Result<T, ImageError> {
        self.map_err(|problem| ImageError::Invalid {
            path: path.to_path_buf(),
            problem,
        })
    }
}

impl<T> AtPath<T> for Result<T, CreateError> {
    fn at(self, path: &std::path::Path) -> Result<T, ImageError> {
        self.map_err(|reason| ImageError::Create {
            path: path.to_path_buf(),
            reason,
        })
    }
}

impl<T> AtPath<T> for Result<T, crate::DetectError> {
    fn at(self, path: &std::path::Path) -> Result<T, ImageError> {
        self.map_err(|e| e.at(path))
    }
}

impl<T> AtPath<T> for Result<T, BlockError> {
    fn at(self, path: &std::path::Path) -> Result<T, ImageError> {
        self.map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}
