//! How a `$DATA` stream is stored ([`Layout`]): inside the file record, or in clusters as
//! they are, or LZNT1-compressed — with its data runs in VCN order, gathered from every
//! record when the file's attribute list spreads the value over several. The crate's own
//! view of such a value is not used: when the value starts in the base record and goes on in
//! an extension record, `NtfsFile::data` returns the later piece, whose length reads as 0.

use ntfs::attribute_value::NtfsAttributeValue;
use ntfs::structured_values::NtfsAttributeList;
use ntfs::{Ntfs, NtfsAttribute, NtfsAttributeFlags, NtfsAttributeType, NtfsFile};

use super::err;
use super::reader::Padded;
use super::runs::{Compressed, RunList};
use crate::{NodeId, Result};

/// Most data runs gathered for one value, and attribute list entries looked at (a file this
/// fragmented is hostile).
const MAX_RUNS: usize = 1 << 20;

/// How a `$DATA` stream is stored.
pub enum Layout {
    /// Inside the file record (copied out).
    Resident(Vec<u8>),
    /// In clusters, as they are.
    Plain { len: u64, runs: RunList },
    /// In clusters, LZNT1-compressed unit by unit.
    Compressed(Compressed),
}

impl Layout {
    pub fn len(&self) -> u64 {
        match self {
            Layout::Resident(bytes) => bytes.len() as u64,
            Layout::Plain { len, .. } => *len,
            Layout::Compressed(c) => c.len(),
        }
    }

    /// Bytes the stream occupies in clusters.
    pub fn allocated(&self) -> u64 {
        match self {
            Layout::Resident(_) => 0,
            Layout::Plain { runs, .. } => runs.allocated(),
            Layout::Compressed(c) => c.allocated(),
        }
    }
}

/// How the unnamed (or named) `$DATA` stream of `file` (record `node`) is stored; `None`
/// without one.
pub fn of(
    ntfs: &Ntfs,
    r: &mut Padded,
    file: &NtfsFile<'_>,
    stream: &str,
    node: NodeId,
) -> Result<Option<Layout>> {
    let ctx = format!("file record {node}");
    if let Some(list) = attribute_list(r, file, &ctx)? {
        return listed(ntfs, r, &list, stream, &ctx);
    }
    for attr in file.attributes_raw() {
        let attr = attr.map_err(|e| err(&ctx, e))?;
        if is_stream(&attr, stream) {
            let mut runs = Vec::new();
            let Some(header) = first_piece(r, &attr, &ctx, &mut runs)? else {
                return Ok(Some(resident(r, &attr, &ctx)?));
            };
            return Ok(Some(header.layout(ntfs, runs, &ctx)?));
        }
    }
    Ok(None)
}

/// The names of the file's alternate data streams (its named `$DATA` attributes), each once.
pub fn stream_names(r: &mut Padded, file: &NtfsFile<'_>, node: NodeId) -> Result<Vec<String>> {
    let ctx = format!("file record {node}");
    let mut names = Vec::new();
    if let Some(list) = attribute_list(r, file, &ctx)? {
        let mut entries = list.entries();
        while let Some(entry) = entries.next(r) {
            let entry = entry.map_err(|e| err(&ctx, e))?;
            if names.len() >= MAX_RUNS {
                return Err(err(&ctx, "too many alternate data streams"));
            }
            if entry.ty().ok() == Some(NtfsAttributeType::Data) && entry.name_length() > 0 {
                names.push(entry.name().to_string_lossy());
            }
        }
    } else {
        for attr in file.attributes_raw() {
            let attr = attr.map_err(|e| err(&ctx, e))?;
            if attr.ty().ok() == Some(NtfsAttributeType::Data) && attr.name_length() > 0 {
                names.push(attr.name().map_err(|e| err(&ctx, e))?.to_string_lossy());
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    Ok(names)
}

/// Whether `attr` is the `$DATA` attribute (or piece) of stream `name`.
fn is_stream(attr: &NtfsAttribute<'_, '_>, name: &str) -> bool {
    attr.ty().ok() == Some(NtfsAttributeType::Data) && attr.name().is_ok_and(|n| n == name)
}

/// What the first piece of a non-resident value says of all of it.
struct Header {
    len: u64,
    compressed: bool,
}

impl Header {
    fn layout(self, ntfs: &Ntfs, runs: Vec<(u64, Option<u64>)>, ctx: &str) -> Result<Layout> {
        let cluster = u64::from(ntfs.cluster_size());
        let runs = RunList::new(cluster, runs.into_iter().map(Ok)).map_err(|e| err(ctx, e))?;
        Ok(if self.compressed {
            Layout::Compressed(Compressed::new(runs, self.len)?)
        } else {
            Layout::Plain {
                len: self.len,
                runs,
            }
        })
    }
}

/// A resident value, copied out of its record (at most a record's size).
fn resident(r: &mut Padded, attr: &NtfsAttribute<'_, '_>, ctx: &str) -> Result<Layout> {
    match attr.value(r).map_err(|e| err(ctx, e))? {
        NtfsAttributeValue::Resident(v) => Ok(Layout::Resident(v.data().to_vec())),
        _ => Err(err(ctx, "a resident attribute without a resident value")),
    }
}

/// The header and runs (appended to `runs`) of the first piece of a value; `None` when the
/// value is resident.
fn first_piece(
    r: &mut Padded,
    attr: &NtfsAttribute<'_, '_>,
    ctx: &str,
    runs: &mut Vec<(u64, Option<u64>)>,
) -> Result<Option<Header>> {
    if attr.is_resident() {
        return Ok(None);
    }
    append_runs(r, attr, ctx, runs)?;
    Ok(Some(Header {
        len: attr.value_length(),
        compressed: attr.flags().contains(NtfsAttributeFlags::COMPRESSED),
    }))
}

/// Appends the (bytes, disk position) runs of one non-resident piece to `runs`; returns the
/// clusters' bytes it covers.
fn append_runs(
    r: &mut Padded,
    attr: &NtfsAttribute<'_, '_>,
    ctx: &str,
    runs: &mut Vec<(u64, Option<u64>)>,
) -> Result<u64> {
    let NtfsAttributeValue::NonResident(value) = attr.value(r).map_err(|e| err(ctx, e))? else {
        return Err(err(ctx, "a piece of a non-resident value is resident"));
    };
    let mut bytes = 0u64;
    for run in value.data_runs() {
        let run = run.map_err(|e| err(ctx, e))?;
        if runs.len() >= MAX_RUNS {
            return Err(err(ctx, format!("more than {MAX_RUNS} data runs")));
        }
        runs.push((
            run.allocated_size(),
            run.data_position().value().map(|p| p.get()),
        ));
        bytes = bytes.saturating_add(run.allocated_size());
    }
    Ok(bytes)
}

/// A value spread over the records the file's attribute list names: every `$DATA` piece of
/// stream `name`, in the order of their first VCN (the first, at VCN 0, holds the value's
/// length and flags), a gap between them sparse.
fn listed(
    ntfs: &Ntfs,
    r: &mut Padded,
    list: &NtfsAttributeList<'_, '_>,
    name: &str,
    ctx: &str,
) -> Result<Option<Layout>> {
    let cluster = u64::from(ntfs.cluster_size());
    let mut entries = list.entries();
    let mut runs: Vec<(u64, Option<u64>)> = Vec::new();
    let mut header = None;
    let mut next_vcn = 0u64;
    let mut seen = 0usize;
    while let Some(entry) = entries.next(r) {
        let entry = entry.map_err(|e| err(ctx, e))?;
        seen += 1;
        if seen > MAX_RUNS {
            return Err(err(
                ctx,
                format!("more than {MAX_RUNS} attribute list entries"),
            ));
        }
        if entry.ty().ok() != Some(NtfsAttributeType::Data) || entry.name() != name {
            continue;
        }
        let lowest = u64::try_from(entry.lowest_vcn().value())
            .map_err(|_| err(ctx, "a negative VCN in the attribute list"))?;
        if lowest < next_vcn || (header.is_none() && lowest != 0) {
            return Err(err(ctx, "attribute list pieces overlap or miss the first"));
        }
        if lowest > next_vcn {
            let gap = (lowest - next_vcn)
                .checked_mul(cluster)
                .ok_or_else(|| err(ctx, "attribute list VCN out of range"))?;
            runs.push((gap, None));
        }
        let piece_file = entry.to_file(ntfs, r).map_err(|e| err(ctx, e))?;
        let piece = entry.to_attribute(&piece_file).map_err(|e| err(ctx, e))?;
        let bytes = if header.is_none() {
            let before = runs.len();
            match first_piece(r, &piece, ctx, &mut runs)? {
                Some(h) => header = Some(h),
                None => return resident(r, &piece, ctx).map(Some),
            }
            runs[before..].iter().map(|r| r.0).sum()
        } else {
            append_runs(r, &piece, ctx, &mut runs)?
        };
        next_vcn = lowest.saturating_add(bytes / cluster);
    }
    header.map(|h| h.layout(ntfs, runs, ctx)).transpose()
}

/// The file's `$ATTRIBUTE_LIST`, if it has one.
fn attribute_list<'n, 'f>(
    r: &mut Padded,
    file: &'f NtfsFile<'n>,
    ctx: &str,
) -> Result<Option<NtfsAttributeList<'n, 'f>>> {
    for attr in file.attributes_raw() {
        let attr = attr.map_err(|e| err(ctx, e))?;
        if attr.ty().ok() == Some(NtfsAttributeType::AttributeList) {
            return attr
                .structured_value::<_, NtfsAttributeList>(r)
                .map(Some)
                .map_err(|e| err(ctx, e));
        }
    }
    Ok(None)
}
