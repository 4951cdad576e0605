//! Spans of guest memory that a descriptor chain names, shared by the virtio devices that
//! frame their requests by byte position rather than by descriptor.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory as _, Permissions};

use crate::devices::GuestMemory;

/// A span of guest memory, already checked to lie inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u64,
}

/// A descriptor that does not lie inside guest memory (for the access asked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutsideMemory {
    pub addr: u64,
    pub len: u32,
}

/// Descriptor `d` as a span, checked to lie in guest memory for `access`; `None` if empty.
pub(crate) fn descriptor_segment(
    d: &Descriptor,
    mem: &GuestMemory,
    access: Permissions,
) -> Result<Option<Segment>, OutsideMemory> {
    if d.len() == 0 {
        return Ok(None);
    }
    if !mem.check_range(d.addr(), d.len() as usize, access) {
        return Err(OutsideMemory {
            addr: d.addr().raw_value(),
            len: d.len(),
        });
    }
    Ok(Some(Segment {
        addr: d.addr(),
        len: u64::from(d.len()),
    }))
}

/// The non-empty descriptors of a chain as spans, each checked as `descriptor_segment`
/// does; Err: the first one outside guest memory.
pub(crate) fn descriptor_segments(
    descs: &[Descriptor],
    mem: &GuestMemory,
    access: Permissions,
) -> Result<Vec<Segment>, OutsideMemory> {
    let mut segs = Vec::with_capacity(descs.len());
    for d in descs {
        segs.extend(descriptor_segment(d, mem, access)?);
    }
    Ok(segs)
}

/// Total length of spans. Spans are at most u32::MAX each and chains are short:
/// saturation is never reached, it only keeps arbitrary input from overflowing.
pub fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().fold(0u64, |sum, s| sum.saturating_add(s.len))
}

/// Splits spans at byte `at`: the first `at` bytes and the rest; `None` if shorter.
pub(crate) fn split_segments(
    segs: &[Segment],
    mut at: u64,
) -> Option<(Vec<Segment>, Vec<Segment>)> {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    for seg in segs {
        if at >= seg.len {
            head.push(*seg);
            at -= seg.len;
        } else if at > 0 {
            head.push(Segment {
                addr: seg.addr,
                len: at,
            });
            tail.push(Segment {
                addr: seg.addr.checked_add(at)?,
                len: seg.len - at,
            });
            at = 0;
        } else {
            tail.push(*seg);
        }
    }
    (at == 0).then_some((head, tail))
}

/// Reads exactly `buf.len()` bytes from the spans, in order; Err: the guest address that
/// could not be read (or the last span's, when the spans are too short).
pub(crate) fn read_segments(
    mem: &GuestMemory,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<(), u64> {
    let mut done = 0usize;
    for seg in segs {
        if done == buf.len() {
            break;
        }
        let n = usize::try_from(seg.len)
            .unwrap_or(usize::MAX)
            .min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], seg.addr)
            .map_err(|_| seg.addr.raw_value())?;
        done += n;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(segs.last().map_or(0, |s| s.addr.raw_value()))
    }
}

/// Where [`write_segments`] stopped: a span it could not write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WriteStopped {
    /// Bytes written before it.
    pub written: usize,
    pub addr: u64,
}

/// Writes `parts`, one after the other, as a single byte stream over the spans, until the
/// bytes or the spans run out; returns the bytes written.
pub(crate) fn write_segments(
    mem: &GuestMemory,
    segs: &[Segment],
    parts: &[&[u8]],
) -> Result<usize, WriteStopped> {
    let mut written = 0usize;
    let mut segs = segs.iter().copied();
    // What is left of the span being written.
    let mut current: Option<Segment> = None;
    for part in parts {
        let mut part: &[u8] = part;
        while !part.is_empty() {
            let seg = match current.take() {
                Some(seg) if seg.len > 0 => seg,
                _ => match segs.next() {
                    Some(seg) => seg,
                    None => return Ok(written),
                },
            };
            let stopped = WriteStopped {
                written,
                addr: seg.addr.raw_value(),
            };
            let n = usize::try_from(seg.len)
                .unwrap_or(usize::MAX)
                .min(part.len());
            mem.write_slice(&part[..n], seg.addr).map_err(|_| stopped)?;
            part = &part[n..];
            written += n;
            let left = seg.len - n as u64;
            if left > 0 {
                current = Some(Segment {
                    addr: seg.addr.checked_add(n as u64).ok_or(stopped)?,
                    len: left,
                });
            }
        }
    }
    Ok(written)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn splits_inside_and_between_spans() {
        let s = |a, l| Segment {
            addr: GuestAddress(a),
            len: l,
        };
        let segs = [s(0x1000, 16), s(0x2000, 8)];
        assert_eq!(
            split_segments(&segs, 16),
            Some((vec![s(0x1000, 16)], vec![s(0x2000, 8)]))
        );
        assert_eq!(
            split_segments(&segs, 20),
            Some((vec![s(0x1000, 16), s(0x2000, 4)], vec![s(0x2004, 4)]))
        );
        assert_eq!(split_segments(&segs, 24), Some((segs.to_vec(), vec![])));
        assert_eq!(split_segments(&segs, 25), None);
    }

    #[test]
    fn writes_parts_as_one_stream_until_either_runs_out() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let s = |a, l| Segment {
            addr: GuestAddress(a),
            len: l,
        };
        let segs = [s(0x100, 3), s(0x200, 4)];
        assert_eq!(write_segments(&mem, &segs, &[b"ab", b"cdef"]), Ok(6));
        let mut back = [0u8; 4];
        mem.read_slice(&mut back[..3], GuestAddress(0x100)).unwrap();
        assert_eq!(&back[..3], b"abc");
        mem.read_slice(&mut back, GuestAddress(0x200)).unwrap();
        assert_eq!(&back, b"def\0");
        // More bytes than room: as much as fits.
        assert_eq!(write_segments(&mem, &segs, &[b"0123456789"]), Ok(7));
        // A span outside memory stops it, naming what was written before.
        let bad = [s(0x100, 2), s(0x2000, 8)];
        assert_eq!(
            write_segments(&mem, &bad, &[b"xyz"]),
            Err(WriteStopped {
                written: 2,
                addr: 0x2000
            })
        );
    }
}
