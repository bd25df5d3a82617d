//! What xtask reads of a 64-bit ELF file, through the `object` crate: the
//! machine, whether it is position independent, its interpreter, the shared
//! libraries its dynamic segment needs (dist's static check), and whether a
//! symbol table is left (bench's stripped check).

use object::Endianness;
use object::elf::{self, FileHeader64};
use object::read::elf::{Dyn as _, FileHeader as _, ProgramHeader as _, SectionHeader as _};

/// `e_machine` of the x86_64 release target.
pub(crate) const EM_X86_64: u16 = elf::EM_X86_64.0;
/// `e_machine` of the aarch64 release target.
pub(crate) const EM_AARCH64: u16 = elf::EM_AARCH64.0;

/// What `dist` checks in an ELF file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Elf {
    /// `e_machine`.
    pub(crate) machine: u16,
    /// `ET_DYN`: position independent (static-pie when it has no interpreter).
    pub(crate) pie: bool,
    /// The program interpreter a `PT_INTERP` header names.
    pub(crate) interp: Option<String>,
    /// Whether there is a `PT_DYNAMIC` segment (static-pie has one for relocations).
    pub(crate) dynamic: bool,
    /// `DT_NEEDED` entries (shared libraries) in the dynamic segment, up to `DT_NULL`.
    pub(crate) needed: usize,
}

/// The file header and its byte order, or what is wrong with the file.
fn header(b: &[u8]) -> Result<(&FileHeader64<Endianness>, Endianness), String> {
    // Said apart from the rest: a script or a text file is the usual mix-up.
    if b.get(..4) != Some(elf::ELFMAG.as_slice()) {
        return Err("not an ELF file".into());
    }
    let header = FileHeader64::<Endianness>::parse(b).map_err(|e| {
        let class = b.get(4).copied().unwrap_or(0); // e_ident[EI_CLASS]
        format!("not a readable ELF64 file (EI_CLASS {class}): {e}")
    })?;
    let endian = header
        .endian()
        .map_err(|e| format!("unreadable ELF byte order: {e}"))?;
    Ok((header, endian))
}

/// Reads the ELF header and program headers of a 64-bit file. Every program
/// header's segment must lie inside the file.
pub(crate) fn parse(b: &[u8]) -> Result<Elf, String> {
    let (header, endian) = header(b)?;
    let e_type = header.e_type(endian);
    if e_type != elf::ET_EXEC && e_type != elf::ET_DYN {
        return Err(format!("not an executable (e_type {e_type})"));
    }
    let segments = header
        .program_headers(endian, b)
        .map_err(|e| format!("unreadable program headers: {e}"))?;
    let mut out = Elf {
        machine: header.e_machine(endian).0,
        pie: e_type == elf::ET_DYN,
        interp: None,
        dynamic: false,
        needed: 0,
    };
    for (i, ph) in segments.iter().enumerate() {
        ph.data(endian, b)
            .map_err(|()| format!("program header {i} points past the end of the file"))?;
        if let Some(name) = ph
            .interpreter(endian, b)
            .map_err(|e| format!("program header {i} (PT_INTERP): {e}"))?
        {
            out.interp = Some(String::from_utf8_lossy(name).into_owned());
        }
        if let Some(entries) = ph
            .dynamic(endian, b)
            .map_err(|e| format!("program header {i} (PT_DYNAMIC): {e}"))?
        {
            out.dynamic = true;
            out.needed += entries
                .iter()
                .map(|d| d.d_tag(endian))
                .take_while(|&tag| tag != elf::DT_NULL)
                .filter(|&tag| tag == elf::DT_NEEDED)
                .count();
        }
    }
    Ok(out)
}

/// Whether a 64-bit ELF file still has a symbol table; `None` when it is not
/// a readable ELF file.
pub(crate) fn has_symtab(b: &[u8]) -> Option<bool> {
    let (header, endian) = header(b).ok()?;
    let sections = header.section_headers(endian, b).ok()?;
    Some(
        sections
            .iter()
            .any(|s| s.sh_type(endian) == elf::SHT_SYMTAB),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const ET_EXEC: u16 = 2;
    const ET_DYN: u16 = 3;
    const DT_NULL: u64 = 0;
    const DT_NEEDED: u64 = 1;
    const DT_RELA: u64 = 7;

    /// A minimal ELF64 LE file: header, program headers, then their segments.
    fn elf_file(machine: u16, e_type: u16, segments: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let phoff = 64u64;
        let data_start = phoff + 56 * segments.len() as u64;
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // ELFCLASS64
        b[5] = 1; // ELFDATA2LSB
        b[6] = 1; // EV_CURRENT
        b[16..18].copy_from_slice(&e_type.to_le_bytes());
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes()); // e_version
        b[32..40].copy_from_slice(&phoff.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        let mut offset = data_start;
        for (p_type, data) in segments {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&p_type.to_le_bytes());
            ph[8..16].copy_from_slice(&offset.to_le_bytes());
            ph[32..40].copy_from_slice(&(data.len() as u64).to_le_bytes());
            ph[40..48].copy_from_slice(&(data.len() as u64).to_le_bytes());
            b.extend_from_slice(&ph);
            offset += data.len() as u64;
        }
        for (_, data) in segments {
            b.extend_from_slice(data);
        }
        b
    }

    /// A dynamic segment with these (tag, value) entries and a DT_NULL.
    fn dynamic(entries: &[(u64, u64)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (tag, val) in entries.iter().chain([&(DT_NULL, 0)]) {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&val.to_le_bytes());
        }
        out
    }

    #[test]
    fn a_static_executable_reads() {
        let b = elf_file(EM_X86_64, ET_EXEC, &[(PT_LOAD, vec![0; 8])]);
        assert_eq!(
            parse(&b).unwrap(),
            Elf {
                machine: EM_X86_64,
                pie: false,
                interp: None,
                dynamic: false,
                needed: 0
            }
        );
    }

    #[test]
    fn a_static_pie_has_a_dynamic_segment_but_needs_nothing() {
        let b = elf_file(
            EM_AARCH64,
            ET_DYN,
            &[
                (PT_LOAD, vec![0; 8]),
                (PT_DYNAMIC, dynamic(&[(DT_RELA, 0x1000)])),
            ],
        );
        let parsed = parse(&b).unwrap();
        assert!(parsed.pie && parsed.dynamic && parsed.needed == 0);
        assert_eq!(parsed.machine, EM_AARCH64);
    }

    #[test]
    fn needed_libraries_and_the_interpreter_are_read() {
        let b = elf_file(
            EM_X86_64,
            ET_DYN,
            &[
                (PT_INTERP, b"/lib/ld-musl-x86_64.so.1\0".to_vec()),
                (PT_DYNAMIC, dynamic(&[(DT_NEEDED, 1), (DT_NEEDED, 9)])),
            ],
        );
        let parsed = parse(&b).unwrap();
        assert_eq!(parsed.needed, 2);
        assert_eq!(parsed.interp.as_deref(), Some("/lib/ld-musl-x86_64.so.1"));
    }

    #[test]
    fn entries_after_dt_null_are_not_counted() {
        let mut seg = dynamic(&[]);
        seg.extend_from_slice(&dynamic(&[(DT_NEEDED, 1)]));
        let b = elf_file(EM_X86_64, ET_DYN, &[(PT_DYNAMIC, seg)]);
        assert_eq!(parse(&b).unwrap().needed, 0);
    }

    #[test]
    fn other_files_are_refused_without_panicking() {
        assert_eq!(parse(b"#!/bin/sh\n").unwrap_err(), "not an ELF file");
        assert_eq!(has_symtab(b"#!/bin/sh"), None);
        let mut b = elf_file(EM_X86_64, ET_EXEC, &[]);
        b[4] = 1;
        assert!(parse(&b).unwrap_err().contains("EI_CLASS 1"));
        let b = elf_file(EM_X86_64, 1, &[]);
        assert!(parse(&b).unwrap_err().contains("e_type 1"));
        // Every truncation of a valid file is an error, never a panic.
        let full = elf_file(
            EM_X86_64,
            ET_DYN,
            &[
                (PT_INTERP, b"/lib/ld.so\0".to_vec()),
                (PT_DYNAMIC, dynamic(&[(DT_NEEDED, 1)])),
            ],
        );
        parse(&full).unwrap();
        for len in 0..full.len() {
            assert!(parse(&full[..len]).is_err(), "length {len}");
            let _ = has_symtab(&full[..len]);
        }
        // A program header pointing far past the end.
        let mut b = elf_file(EM_X86_64, ET_EXEC, &[(PT_LOAD, vec![0; 4])]);
        b[64 + 8..64 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            parse(&b).unwrap_err().contains("past the end"),
            "{:?}",
            parse(&b)
        );
    }

    #[test]
    fn unaligned_buffers_read() {
        let b = elf_file(EM_X86_64, ET_EXEC, &[(PT_LOAD, vec![0; 8])]);
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&b);
        assert_eq!(parse(&shifted[1..]).unwrap().machine, EM_X86_64);
    }

    #[test]
    fn this_test_binary_reads_as_an_elf_file() {
        let exe = std::env::current_exe().unwrap();
        let bytes = std::fs::read(exe).unwrap();
        assert!(has_symtab(&bytes).is_some());
        let host = if cfg!(target_arch = "x86_64") {
            EM_X86_64
        } else if cfg!(target_arch = "aarch64") {
            EM_AARCH64
        } else {
            return;
        };
        assert_eq!(parse(&bytes).unwrap().machine, host);
    }
}
