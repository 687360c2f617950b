//! Filesystem and disk fixtures made at test time with Debian tools, so their content is
//! known: ext4 populated through the kernel (a read-write loop mount and `cp -a`, which keep
//! nanosecond times, xattrs and ACLs), FAT with mkfs.vfat + mtools, NTFS with mkntfs + ntfscp,
//! and partitioned disks with sgdisk (GPT) and sfdisk (MBR).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{run_ok, sh};

const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A Linux root tree in `dir/tree`: os-release (through a relative symlink, as Debian has it),
/// hostname, fstab, a kernel, module directory, and files exercising every kind of metadata:
/// owners, setuid and sticky modes, nanosecond times, hard links, fast and slow symlinks,
/// a FIFO, a character device, a socket, a sparse file, user/trusted/security xattrs (one too large
/// for the inode), a POSIX ACL and a default ACL.
pub fn linux_tree(dir: &Path) -> PathBuf {
    let t = dir.join("tree");
    let long_target = "a/".repeat(40) + "target";
    sh(&format!(
        r#"
        t={t}
        mkdir -p $t/etc $t/usr/lib $t/boot $t/lib/modules/6.1.0-21-amd64/kernel $t/home/alice/docs $t/var/empty $t/srv/shared
        printf 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n' > $t/usr/lib/os-release
        ln -s ../usr/lib/os-release $t/etc/os-release
        echo fixture-host > $t/etc/hostname
        printf '# static file system information\nUUID=1234 / ext4 errors=remount-ro 0 1\n' > $t/etc/fstab
        head -c 70000 /dev/urandom > $t/boot/vmlinuz-6.1.0-21-amd64
        head -c 5000 /dev/urandom > $t/lib/modules/6.1.0-21-amd64/kernel/virtio.ko
        head -c 1500000 /dev/urandom > $t/home/alice/docs/report.bin
        printf 'hello\n' > $t/home/alice/hello.txt
        : > $t/home/alice/empty
        ln $t/home/alice/docs/report.bin $t/home/alice/report-link.bin
        ln -s hello.txt $t/home/alice/fast-link
        ln -s {long_target} $t/home/alice/slow-link
        ln -s ../../../../../../etc/shadow $t/home/alice/escape
        ln -s /etc/hostname $t/home/alice/abs-link
        mkfifo $t/home/alice/pipe
        mknod $t/home/alice/null-dev c 1 3
        python3 -c "import socket,sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])" $t/home/alice/agent.sock
        truncate -s 5000000 $t/home/alice/sparse.img
        printf 'middle' | dd of=$t/home/alice/sparse.img bs=1 seek=2500000 conv=notrunc status=none
        chown -R 1000:1000 $t/home/alice
        chown 1234:5678 $t/home/alice/hello.txt
        chmod 4755 $t/home/alice/docs/report.bin
        chmod 1777 $t/srv/shared
        chmod 0640 $t/home/alice/hello.txt
        setfattr -n user.comment -v 'a note' $t/home/alice/hello.txt
        setfattr -n trusted.origin -v fixture $t/home/alice/hello.txt
        setfattr -n security.selinux -v 'system_u:object_r:user_home_t:s0' $t/home/alice/hello.txt
        setfattr -n user.big -v "$(head -c 3000 /dev/zero | tr '\0' 'x')" $t/home/alice/docs/report.bin
        setfacl -m u:2000:rw,g:3000:r $t/home/alice/hello.txt
        setfacl -d -m u:2000:rwx $t/srv/shared
        touch -m -d '2001-02-03 04:05:06.123456789' $t/home/alice/hello.txt
        touch -a -d '2002-03-04 05:06:07.987654321' $t/home/alice/hello.txt
        touch -h -m -d '2003-04-05 06:07:08.5' $t/home/alice/fast-link
        "#,
        t = p(&t)
    ));
    t
}

/// An ext4 image of `size_mib` holding a copy of `tree`, written by the kernel.
pub fn ext4_image(tree: &Path, image: &Path, size_mib: u64, label: &str) {
    let mnt = image.with_extension("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&format!(
        r#"
        truncate -s {size}M {img}
        mkfs.ext4 -q -b 4096 -L {label} {img}
        mount -o loop {img} {mnt}
        trap 'umount {mnt}' EXIT
        cp -a {tree}/. {mnt}/
        "#,
        size = size_mib,
        img = p(image),
        mnt = p(&mnt),
        tree = p(tree),
    ));
}

/// A FAT image (`bits` 12, 16 or 32) with a known set of files, directories and attributes.
pub fn fat_image(image: &Path, bits: u32, size_mib: u64, label: &str) {
    let src = image.with_extension("src");
    std::fs::create_dir_all(&src).unwrap();
    sh(&format!(
        r#"
        export MTOOLS_SKIP_CHECK=1
        cd {src}
        printf 'efi binary' > bootx64.efi
        head -c 300000 /dev/urandom > data.bin
        printf 'x' > short.txt
        truncate -s {size}M {img}
        mkfs.vfat -F {bits} -n {label} {img} >/dev/null
        mmd -i {img} ::/EFI ::/EFI/BOOT ::/EFI/BOOT/fonts ::/Empty
        mcopy -i {img} short.txt ::/EFI/BOOT/fonts/README.TXT
        mcopy -i {img} bootx64.efi ::/EFI/BOOT/BOOTX64.EFI
        mcopy -i {img} data.bin "::/A Long File Name.bin"
        mcopy -i {img} short.txt ::/SHORT.TXT
        : > empty; mcopy -i {img} empty ::/Empty/zero.txt
        mattrib -i {img} +h +s "::/A Long File Name.bin"
        mattrib -i {img} +r ::/SHORT.TXT
        "#,
        src = p(&src),
        img = p(image),
        size = size_mib,
        bits = bits,
        label = label,
    ));
}

/// The SOFTWARE and SYSTEM hives of a Windows 10 Pro 22H2 machine named WIN-FIXTURE
/// (only the keys Windows detection reads).
pub fn windows_hives() -> (Vec<u8>, Vec<u8>) {
    use crate::hive::{hive, key, leaf, Value};
    let software = hive(&key(
        "ROOT",
        vec![key(
            "Microsoft",
            vec![key(
                "Windows NT",
                vec![leaf(
                    "CurrentVersion",
                    vec![
                        ("ProductName", Value::Sz("Windows 10 Pro")),
                        ("EditionID", Value::Sz("Professional")),
                        ("DisplayVersion", Value::Sz("22H2")),
                        ("CurrentBuild", Value::Sz("19045")),
                    ],
                )],
            )],
        )],
    ));
    let system = hive(&key(
        "ROOT",
        vec![
            leaf("Select", vec![("Current", Value::Dword(2))]),
            key(
                "ControlSet002",
                vec![key(
                    "Control",
                    vec![key(
                        "ComputerName",
                        vec![leaf(
                            "ComputerName",
                            vec![("ComputerName", Value::Sz("WIN-FIXTURE"))],
                        )],
                    )],
                )],
            ),
        ],
    ));
    (software, system)
}

/// An NTFS image with files, an alternate data stream, a hard link, and a Windows
/// directory with registry hives (created through an ntfs-3g FUSE mount).
pub fn ntfs_image(image: &Path, size_mib: u64, label: &str) {
    let src = image.with_extension("src");
    std::fs::create_dir_all(&src).unwrap();
    let (software, system) = windows_hives();
    std::fs::write(src.join("SOFTWARE"), software).unwrap();
    std::fs::write(src.join("SYSTEM"), system).unwrap();
    let mnt = image.with_extension("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&format!(
        r#"
        cd {src}
        head -c 2000000 /dev/urandom > big.bin
        printf 'hello ntfs\n' > hello.txt
        printf 'hidden stream\n' > stream.txt
        truncate -s {size}M {img}
        mkntfs -q -F -Q -L {label} {img} 2>/dev/null
        ntfscp {img} big.bin 'Big File.bin'
        ntfscp {img} hello.txt hello.txt
        ntfscp -N Zone.Identifier {img} stream.txt hello.txt
        ntfs-3g {img} {mnt}
        trap 'umount {mnt}' EXIT
        mkdir -p {mnt}/Windows/System32/config
        cp SOFTWARE SYSTEM {mnt}/Windows/System32/config/
        ln '{mnt}/Big File.bin' {mnt}/Windows/big-link.bin
        "#,
        mnt = p(&mnt),
        src = p(&src),
        img = p(image),
        size = size_mib,
        label = label,
    ));
}

/// Copies the raw filesystem `image` into `disk` at byte `offset`, sparsely.
pub fn place(disk: &Path, offset: u64, image: &Path) {
    let src = std::fs::File::open(image).unwrap();
    let dst = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    let len = src.metadata().unwrap().len();
    let mut buf = vec![0u8; MIB as usize];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(MIB) as usize;
        src.read_exact_at(&mut buf[..n], at).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], offset + at).unwrap();
        }
        at += n as u64;
    }
}

/// A GPT disk: `parts` are (size in MiB, sgdisk type code, name); returns each partition's
/// byte offset. Partitions start at 1 MiB and follow each other.
pub fn gpt_disk(disk: &Path, size_mib: u64, parts: &[(u64, &str, &str)]) -> Vec<u64> {
    std::fs::File::create(disk)
        .unwrap()
        .set_len(size_mib * MIB)
        .unwrap();
    let mut args = vec![
        "-U".to_string(),
        "11111111-2222-3333-4444-555555555555".into(),
    ];
    let mut offsets = Vec::new();
    let mut start = MIB / 512;
    for (i, (mib, code, name)) in parts.iter().enumerate() {
        let n = i + 1;
        let end = start + mib * MIB / 512 - 1;
        args.push(format!("-n{n}:{start}:{end}"));
        args.push(format!("-t{n}:{code}"));
        args.push(format!("-c{n}:{name}"));
        offsets.push(start * 512);
        start = end + 1;
    }
    args.push(p(disk).to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok("sgdisk", &args);
    offsets
}

/// A GPT disk of `size_mib` at `disk`: a 40 MiB FAT32 ESP, then a 96 MiB ext4 root holding a
/// copy of `tree` (last, so a deploy can shrink or grow it). Returns the root filesystem image
/// (for its identity) and the partitions' offsets.
pub fn esp_root_disk(disk: &Path, tree: &Path, size_mib: u64) -> (PathBuf, Vec<u64>) {
    let dir = disk.parent().unwrap();
    let ext4 = dir.join("root.ext4");
    ext4_image(tree, &ext4, 96, "rootfs");
    let fat = dir.join("esp.fat");
    fat_image(&fat, 32, 40, "ESP");
    let offsets = gpt_disk(
        disk,
        size_mib,
        &[(40, "ef00", "EFI system"), (96, "8300", "root")],
    );
    place(disk, offsets[0], &fat);
    place(disk, offsets[1], &ext4);
    (ext4, offsets)
}

/// An MBR disk with signature 0x12345678: two primaries, then an extended partition with
/// two logical ones; `sizes` are the four filesystem partitions in MiB and `ids` their
/// types. Returns their offsets (partitions 1, 2, 5, 6).
pub fn mbr_disk(disk: &Path, size_mib: u64, sizes: [u64; 4], ids: [&str; 4]) -> Vec<u64> {
    std::fs::File::create(disk)
        .unwrap()
        .set_len(size_mib * MIB)
        .unwrap();
    let s = sizes.map(|m| m * MIB / 512);
    let mut script = "label: dos\nlabel-id: 0x12345678\n".to_string();
    let mut at = MIB / 512;
    let mut offsets = Vec::new();
    for i in 0..2 {
        script.push_str(&format!("start={at}, size={}, type={}\n", s[i], ids[i]));
        offsets.push(at * 512);
        at += s[i];
    }
    let ext_size = s[2] + s[3] + 4 * MIB / 512;
    script.push_str(&format!("start={at}, size={ext_size}, type=5\n"));
    let mut logical = at + MIB / 512;
    for i in 2..4 {
        script.push_str(&format!(
            "start={logical}, size={}, type={}\n",
            s[i], ids[i]
        ));
        offsets.push(logical * 512);
        logical += s[i] + MIB / 512;
    }
    let mut child = Command::new("sfdisk")
        .args(["-q", p(disk)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk (install fdisk)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed:\n{script}");
    offsets
}

/// A GPT disk with four partitions — a FAT32 ESP, an ext4 root holding [`linux_tree`], an NTFS
/// volume with Windows hives, and one of random bytes — plus a FAT16 volume for MBR disks, all
/// in a temporary directory that lives as long as the value.
pub struct SampleDisk {
    _dir: tempfile::TempDir,
    pub dir: PathBuf,
    pub tree: PathBuf,
    pub ext4: PathBuf,
    pub fat32: PathBuf,
    pub fat16: PathBuf,
    pub ntfs: PathBuf,
    pub gpt: PathBuf,
    pub gpt_offsets: Vec<u64>,
}

impl SampleDisk {
    pub fn build() -> SampleDisk {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let tree = linux_tree(&d);
        let ext4 = d.join("root.ext4");
        ext4_image(&tree, &ext4, 48, "rootfs");
        let fat32 = d.join("esp.fat32");
        fat_image(&fat32, 32, 40, "ESP");
        let fat16 = d.join("data.fat16");
        fat_image(&fat16, 16, 16, "DATA16");
        let ntfs = d.join("win.ntfs");
        ntfs_image(&ntfs, 24, "WINDOWS");
        let gpt = d.join("gpt.img");
        let gpt_offsets = gpt_disk(
            &gpt,
            120,
            &[
                (40, "ef00", "EFI system partition"),
                (48, "8300", "root"),
                (24, "0700", "windows"),
                (4, "8300", "mystery"),
            ],
        );
        place(&gpt, gpt_offsets[0], &fat32);
        place(&gpt, gpt_offsets[1], &ext4);
        place(&gpt, gpt_offsets[2], &ntfs);
        let file = std::fs::OpenOptions::new().write(true).open(&gpt).unwrap();
        // The unknown partition holds noise, and so does the gap after the GPT (where a boot
        // loader's core image would be).
        let noise: Vec<u8> = (0..MIB as usize)
            .map(|i| (i * 7919 % 251) as u8 | 1)
            .collect();
        file.write_all_at(&noise, gpt_offsets[3]).unwrap();
        file.write_all_at(&noise[..64 << 10], 64 << 10).unwrap();
        SampleDisk {
            dir: d,
            _dir: dir,
            tree,
            ext4,
            fat32,
            fat16,
            ntfs,
            gpt,
            gpt_offsets,
        }
    }
}

/// The last sector of GPT partition `n` of `disk`, as sgdisk reports it.
pub fn sgdisk_last_sector(disk: &Path, n: u32) -> u64 {
    sgdisk_sector(disk, n, "Last sector: ")
}

/// Partition `n`'s byte offset and length in a GPT disk, as sgdisk reads them.
pub fn gpt_partition_range(disk: &Path, n: u32) -> (u64, u64) {
    let first = sgdisk_sector(disk, n, "First sector: ");
    let last = sgdisk_sector(disk, n, "Last sector: ");
    (first * 512, (last + 1 - first) * 512)
}

fn sgdisk_sector(disk: &Path, n: u32, field: &str) -> u64 {
    let info = run_ok("sgdisk", &["-i", &n.to_string(), disk.to_str().unwrap()]);
    info.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field:?} in:\n{info}"))
}

/// `len` bytes at `offset` of `raw` as a file of their own (streamed, holes kept).
pub fn extract(raw: &Path, offset: u64, len: u64, to: &Path) -> PathBuf {
    let src = std::fs::File::open(raw).unwrap();
    let dst = std::fs::File::create(to).unwrap();
    dst.set_len(len).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], offset + at).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], at).unwrap();
        }
        at += n as u64;
    }
    to.to_path_buf()
}

/// The partitions `sfdisk --json` sees on `disk`: (partition number as a string, start,
/// size), bytes.
pub fn sfdisk_partitions(disk: &Path) -> Vec<(String, u64, u64)> {
    let json: serde_json::Value =
        serde_json::from_str(&run_ok("sfdisk", &["--json", p(disk)])).unwrap();
    json["partitiontable"]["partitions"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .map(|part| {
                    let node = part["node"].as_str().unwrap_or_default();
                    (
                        node.trim_start_matches(p(disk)).to_string(),
                        part["start"].as_u64().unwrap_or(0) * 512,
                        part["size"].as_u64().unwrap_or(0) * 512,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
