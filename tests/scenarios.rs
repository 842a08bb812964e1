//! Real programs inside the mount: each scenario runs on kernel overlayfs and on the system under test
//! over the same lowers, asserts the same exit status and output, the same merged tree, and something
//! specific about the result.

use crate::dual::{Dual, scen_opts};
use crate::util::{can_mount, have_program, skip};
use std::path::Path;

fn entry_mode(d: &Dual, rel: &str) -> u32 {
    let st = rustix::fs::lstat(d.sut.path.join(rel)).expect("lstat in sut");
    st.st_mode & 0o7777
}

fn read(d: &Dual, rel: &str) -> String {
    std::fs::read_to_string(d.sut.path.join(rel)).expect("read in sut")
}

#[test]
fn scenario_cp_a() {
    if !can_mount("scenario_cp_a") {
        return;
    }
    let d = Dual::new("cp-a");
    d.run("cp -a proj proj2 && cp -a data/sub etc/ && cp -a etc/app.conf etc/app.conf.bak");
    let snap = d.assert_same("after cp -a", &scen_opts());
    // The copy equals the original: names, types, modes, owners, contents, symlink targets, times.
    for (k, v) in snap.entries.iter().filter(|(k, _)| k.starts_with("proj/")) {
        let copy = format!("proj2/{}", &k["proj/".len()..]);
        assert_eq!(snap.entries.get(&copy), Some(v), "{copy} differs from {k}");
    }
    assert_eq!(read(&d, "etc/app.conf.bak"), "a=override\n");
    assert_eq!(entry_mode(&d, "etc/sub"), 0o750);
    // cp -a keeps hard links within what it copies.
    assert!(
        snap.link_groups.contains(&vec![
            "proj2/docs/readme.hard".into(),
            "proj2/docs/readme.txt".into()
        ]),
        "hard link lost in copy: {:?}",
        snap.link_groups
    );
    d.assert_cross_mounts("scenario_cp_a", &scen_opts());
}

#[test]
fn scenario_tar_c_and_x() {
    if !can_mount("scenario_tar_c_and_x") {
        return;
    }
    if !have_program("tar") {
        skip("scenario_tar_c_and_x", "tar not installed");
        return;
    }
    let d = Dual::new("tar");
    // tar c: identical archives (hard-link detection relies on st_ino/st_nlink being right).
    let out = d.run(
        "tar --sort=name --format=gnu -cf - proj etc data/sub data/big.bin | sha256sum; \
         tar --sort=name -cvvf /dev/null proj etc 2>&1 | sed 's/ \\+/ /g'",
    );
    assert!(
        out.contains("proj/docs/readme.txt link to proj/docs/readme.hard")
            || out.contains("proj/docs/readme.hard link to proj/docs/readme.txt"),
        "tar did not see the hard link:\n{out}"
    );
    assert!(!out.contains("old.txt"), "whited-out file archived:\n{out}");
    // tar x over lower files, into a lower dir and a new one.
    let src = d.fix.dir("tarsrc");
    crate::util::sh_ok(
        &src,
        "mkdir -p proj/src newpkg/deep && printf 'fn main() { new }\\n' > proj/src/main.rs && \
         printf 'n\\n' > newpkg/deep/n.txt && ln -s deep/n.txt newpkg/link && chmod 0700 newpkg && \
         touch -d @1234567890 proj/src/main.rs newpkg/deep/n.txt && \
         tar --sort=name -cf ../in.tar .",
    );
    let tarball = d.fix.path().join("in.tar");
    d.run(&format!("tar -xpf {}", tarball.display()));
    d.assert_same("after tar x", &scen_opts());
    assert_eq!(read(&d, "proj/src/main.rs"), "fn main() { new }\n");
    assert_eq!(read(&d, "newpkg/link"), "n\n");
    assert_eq!(entry_mode(&d, "newpkg"), 0o700);
    let st = rustix::fs::stat(d.sut.path.join("proj/src/main.rs")).expect("stat");
    assert_eq!(st.st_mtime, 1_234_567_890, "tar x did not restore mtime");
    d.assert_cross_mounts("scenario_tar_c_and_x", &scen_opts());
}

#[test]
fn scenario_mv_lower_dir() {
    if !can_mount("scenario_mv_lower_dir") {
        return;
    }
    let d = Dual::new("mv");
    // An strace-free way to see that rename(2) itself succeeded: python's os.rename does no fallback.
    let out = d.run(
        "mv proj renamed && mv etc/conf.d etc/conf.e && \
         python3 -c 'import os; os.rename(\"data/sub\", \"data/sub2\"); print(\"renamed\")' && \
         ls -R renamed etc data",
    );
    assert!(out.contains("renamed\n"), "{out}");
    let snap = d.assert_same("after mv of lower dirs", &scen_opts());
    assert!(!snap.entries.contains_key("proj"));
    assert_eq!(read(&d, "renamed/src/main.rs"), "fn main() {}\n");
    assert_eq!(read(&d, "renamed/src/lib.rs"), "fn lib() {}\n");
    assert!(
        !snap.entries.contains_key("renamed/docs/old.txt"),
        "whiteout lost by rename"
    );
    assert_eq!(read(&d, "etc/conf.e/y.conf"), "y\n");
    assert_eq!(entry_mode(&d, "data/sub2"), 0o750);
    // Renaming inside a renamed lower dir, and reusing the old name.
    d.run("mkdir proj && echo fresh > proj/f && mv renamed/src renamed/src2");
    d.assert_same("after more renames", &scen_opts());
    d.assert_cross_mounts("scenario_mv_lower_dir", &scen_opts());
}

/// A lower directory moved onto a non-empty directory of the upper: refused on both, with the
/// same traces. The kernel overlay copies the source up and sets its redirect before the upper's
/// rename refuses, and that rename (with RENAME_WHITEOUT, on ext4) still moves the old parent's
/// mtime.
#[test]
fn scenario_failed_move_of_a_lower_dir() {
    if !can_mount("scenario_failed_move_of_a_lower_dir") {
        return;
    }
    let d = Dual::new("mvfail");
    let out = d.run(
        "mkdir full && echo x > full/x && python3 -c '
import errno, os
try:
    os.rename(\"etc/conf.d\", \"full\")
except OSError as e:
    print(errno.errorcode[e.errno])'",
    );
    assert_eq!(out.trim(), "ENOTEMPTY");
    d.assert_same("after a refused move", &scen_opts());
    assert_eq!(read(&d, "etc/conf.d/x.conf"), "x\n");
    d.assert_cross_mounts("scenario_failed_move_of_a_lower_dir", &scen_opts());
}

#[test]
fn scenario_git() {
    if !can_mount("scenario_git") {
        return;
    }
    if !have_program("git") {
        skip("scenario_git", "git not installed");
        return;
    }
    let d = Dual::new("git");
    let home = d.fix.dir("home");
    let env = format!(
        "export HOME={} GIT_CONFIG_NOSYSTEM=1 GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@t \
         GIT_COMMITTER_NAME=t GIT_COMMITTER_EMAIL=t@t GIT_AUTHOR_DATE='2001-09-09T01:46:40Z' \
         GIT_COMMITTER_DATE='2001-09-09T01:46:40Z';",
        home.display()
    );
    let out = d.run(&format!(
        "{env} cd proj && git init -q -b main && git add -A && git commit -qm init && \
         echo change >> src/main.rs && git commit -qam second && git rev-parse HEAD && \
         git status --porcelain && git fsck --strict 2>&1 && git log --format='%H %s' && \
         git ls-files -s"
    ));
    let head = out.lines().next().unwrap_or_default();
    assert_eq!(head.len(), 40, "no commit hash:\n{out}");
    assert!(out.contains("readme.hard"), "{out}");
    assert!(
        !out.contains("old.txt"),
        "whited-out file committed:\n{out}"
    );
    let mut opts = scen_opts();
    // The index holds st_ino/st_dev/ctime, which legitimately differ between the two mounts.
    opts.ignore_content = vec!["proj/.git/index".into()];
    d.assert_same("after git", &opts);
    d.assert_cross_mounts("scenario_git", &scen_opts());
}

#[test]
fn scenario_python_venv() {
    if !can_mount("scenario_python_venv") {
        return;
    }
    if !have_program("python3") {
        skip("scenario_python_venv", "python3 not installed");
        return;
    }
    let d = Dual::new("venv");
    let out = d.run(
        "python3 -m venv --without-pip venv && venv/bin/python -c 'import sys; print(sys.prefix)' && \
         venv/bin/python -c 'import json, pathlib; pathlib.Path(\"out.json\").write_text(json.dumps([1]))' && \
         cat out.json",
    );
    assert!(
        out.contains("<MNT>/venv\n"),
        "venv python has wrong prefix:\n{out}"
    );
    assert!(out.ends_with("[1]"), "{out}");
    d.assert_same("after python3 -m venv", &scen_opts());
    d.assert_cross_mounts("scenario_python_venv", &scen_opts());
}

#[test]
fn scenario_sed_i() {
    if !can_mount("scenario_sed_i") {
        return;
    }
    let d = Dual::new("sed");
    d.run(
        "sed -i 's/world/WORLD/' proj/docs/readme.txt && sed -i 's/override/edited/' etc/app.conf && \
         sed -i -e '1d' etc/conf.d/x.conf",
    );
    d.assert_same("after sed -i", &scen_opts());
    assert_eq!(read(&d, "proj/docs/readme.txt"), "hello\nWORLD\n");
    // sed -i replaces the file, so the other hard link keeps the old content.
    assert_eq!(read(&d, "proj/docs/readme.hard"), "hello\nworld\n");
    assert_eq!(read(&d, "etc/app.conf"), "a=edited\n");
    assert_eq!(entry_mode(&d, "etc/app.conf"), 0o640);
    assert_eq!(read(&d, "etc/conf.d/x.conf"), "");
    d.assert_cross_mounts("scenario_sed_i", &scen_opts());
}

#[test]
fn scenario_chmod_r() {
    if !can_mount("scenario_chmod_r") {
        return;
    }
    let d = Dual::new("chmod");
    d.run("chmod -R go-rwx proj data/sub && chmod -R u+x,g+s etc && chown -R 1000:1000 proj/src");
    let snap = d.assert_same("after chmod -R", &scen_opts());
    assert_eq!(entry_mode(&d, "proj/src/main.rs"), 0o600);
    assert_eq!(entry_mode(&d, "proj/src"), 0o700);
    assert_eq!(entry_mode(&d, "etc/conf.d"), 0o2755);
    let main = &snap.entries["proj/src/main.rs"];
    assert_eq!((main.uid, main.gid), (1000, 1000));
    // chmod changes ctime only: copied-up entries keep their lower mtime.
    assert_eq!(
        main.mtime,
        Some(crate::util::TimeClass::Old(crate::dual::LOWER_TIME, 0))
    );
    d.assert_cross_mounts("scenario_chmod_r", &scen_opts());
}

#[test]
fn scenario_find_newer() {
    if !can_mount("scenario_find_newer") {
        return;
    }
    let d = Dual::new("find");
    let out = d.run(
        "touch -d @1500000000 ref && echo x >> etc/app.conf && touch proj/src/lib.rs && \
         mkdir newdir && chmod 600 proj/docs/readme.txt && find . -newer ref | sort",
    );
    // Copy-up of etc/app.conf must restore etc's mtime (overlay-semantics item 9), so ./etc is not newer.
    assert_eq!(out, ".\n./etc/app.conf\n./newdir\n./proj/src/lib.rs\n");
    d.assert_same("after find -newer scenario", &scen_opts());
    d.assert_cross_mounts("scenario_find_newer", &scen_opts());
}

#[test]
fn scenario_long_paths_and_names() {
    if !can_mount("scenario_long_paths_and_names") {
        return;
    }
    let d = Dual::new("longpath");
    // ~3.8 KiB below the mount root, built with relative cd so no single path argument is that long;
    // then a 255-byte name works and a 256-byte one gives ENAMETOOLONG.
    let out = d.run(
        "n=$(printf 'd%.0s' $(seq 200)); i=0; \
         while [ $i -lt 18 ]; do mkdir $n && cd $n || exit 1; i=$((i+1)); done; \
         echo deep > file && cat file && \
         touch $(printf 'f%.0s' $(seq 255)) && ls | wc -l; \
         touch $(printf 'g%.0s' $(seq 256)) 2>&1 | grep -c 'File name too long'",
    );
    assert_eq!(out, "deep\n2\n1\n");
    d.assert_same("after long paths", &scen_opts());
    d.assert_cross_mounts("scenario_long_paths_and_names", &scen_opts());
}

#[test]
fn scenario_big_lower_dir_listing() {
    if !can_mount("scenario_big_lower_dir_listing") {
        return;
    }
    let d = Dual::new("bigdir");
    // 600 lower entries (several getdents batches), 111 removed and 50 added in the upper.
    let out = d.run(
        "ls big | wc -l; rm big/entry-with-a-longish-name-1*; i=0; \
         while [ $i -lt 50 ]; do : > big/new-$i; i=$((i+1)); done; \
         ls big | wc -l; ls -f big | sort | md5sum; ls -f big | sort | uniq -d | wc -l",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "600", "{out}");
    assert_eq!(lines[1], "539", "{out}");
    assert_eq!(lines[3], "0", "readdir listed duplicates:\n{out}");
    d.assert_same("after big dir", &scen_opts());
    d.assert_cross_mounts("scenario_big_lower_dir_listing", &scen_opts());
}

/// A listing read a few entries at a time while the directory changes between the reads: every
/// entry present throughout comes exactly once (the listing is taken at offset 0 and the offsets
/// name it), as on kernel overlayfs.
#[test]
fn scenario_listing_while_the_directory_changes() {
    if !can_mount("scenario_listing_while_the_directory_changes") {
        return;
    }
    if !have_program("python3") {
        skip(
            "scenario_listing_while_the_directory_changes",
            "python3 not installed",
        );
        return;
    }
    let d = Dual::new("listchg");
    let script = r#"python3 - big <<'EOF'
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
d = sys.argv[1]
before = set(os.listdir(d))
os.unlink(os.path.join(d, "entry-with-a-longish-name-7"))
before.discard("entry-with-a-longish-name-7")
fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
buf = ctypes.create_string_buffer(256)
seen, step = [], 0
while True:
    n = libc.syscall(217, fd, buf, len(buf))  # getdents64
    if n < 0:
        raise OSError(ctypes.get_errno(), "getdents64")
    if n == 0 or step > 3000:
        break
    raw, off = buf.raw[:n], 0
    while off < n:
        reclen = struct.unpack_from("H", raw, off + 16)[0]
        seen.append(raw[off + 19:off + reclen].split(b"\0", 1)[0].decode())
        off += reclen
    open(os.path.join(d, "new-%d" % step), "w").close()
    if step % 3 == 2 and step < 100:
        os.unlink(os.path.join(d, "entry-with-a-longish-name-%d" % (500 + step)))
    step += 1
os.close(fd)
stable = [x for x in seen if x in before and not x.startswith("entry-with-a-longish-name-5")]
want = [x for x in before if not x.startswith("entry-with-a-longish-name-5")]
print("batches>100:", 100 < step <= 3000)
print("each stable entry once:", sorted(stable) == sorted(want))
print("dots:", seen.count("."), seen.count(".."))
EOF"#;
    let out = d.run(script);
    assert_eq!(
        out, "batches>100: True\neach stable entry once: True\ndots: 1 1\n",
        "{out}"
    );
    d.assert_same("after listing while changing", &scen_opts());
}

#[test]
fn scenario_ownership_setgid_and_permissions() {
    if !can_mount("scenario_ownership_setgid_and_permissions") {
        return;
    }
    if !have_program("setpriv") {
        skip(
            "scenario_ownership_setgid_and_permissions",
            "setpriv not installed",
        );
        return;
    }
    let d = Dual::new("owner");
    // A setgid lower dir owned by group 1000; an unprivileged user creates files and dirs; permission
    // checks (default_permissions) refuse what the kernel refuses.
    let out = d.run(
        "chown 0:1000 data && chmod 2777 data && \
         as() { setpriv --reuid 1000 --regid 1001 --clear-groups \"$@\"; } && \
         mkdir data/rootdir && as mkdir data/userdir && as touch data/userfile && \
         as sh -c 'echo hi > proj/denied' 2>/dev/null; echo \"denied=$?\"; \
         as cat etc/app.conf >/dev/null 2>&1; echo \"read0640=$?\"; \
         as mv data/userfile data/userfile2 && as rm data/userfile2 && \
         stat -c '%n %a %u:%g' data/rootdir data/userdir",
    );
    assert_eq!(
        out,
        "denied=2\nread0640=1\ndata/rootdir 2755 0:1000\ndata/userdir 2755 1000:1000\n"
    );
    d.assert_same("after ownership scenario", &scen_opts());
    d.assert_cross_mounts("scenario_ownership_setgid_and_permissions", &scen_opts());
}

/// POSIX ACLs set through the mount are enforced and shown as on kernel overlayfs: a user named in
/// a file's ACL reads it although its mode bits say no, chmod updates the ACL mask, and a copied-up
/// file keeps its ACL.
#[test]
fn scenario_posix_acls() {
    if !can_mount("scenario_posix_acls") {
        return;
    }
    if !have_program("setpriv") || !have_program("setfacl") {
        skip("scenario_posix_acls", "setpriv or setfacl not installed");
        return;
    }
    let d = Dual::new("acl");
    let out = d.run(
        "as() { setpriv --reuid 1000 --regid 1001 --clear-groups \"$@\"; } && \
         as cat etc/app.conf >/dev/null 2>&1; echo \"before=$?\"; \
         setfacl -m u:1000:r etc/app.conf && \
         as cat etc/app.conf >/dev/null 2>&1; echo \"after=$?\"; \
         chmod 0600 etc/app.conf && as cat etc/app.conf >/dev/null 2>&1; echo \"masked=$?\"; \
         getfacl -cn etc/app.conf",
    );
    assert_eq!(
        out,
        "before=1\nafter=0\nmasked=1\nuser::rw-\nuser:1000:r--\t#effective:---\ngroup::r--\t#effective:---\nmask::---\nother::---\n\n"
    );
    d.assert_same("after ACL scenario", &scen_opts());
}

/// New objects under a default ACL take it and ignore the umask; elsewhere the umask applies.
/// Covers objects made in place and over whiteouts (built in work/), set-id bits, setgid dirs.
#[test]
fn scenario_default_acls_and_umask() {
    if !can_mount("scenario_default_acls_and_umask") {
        return;
    }
    if !have_program("setfacl") || !have_program("python3") {
        skip(
            "scenario_default_acls_and_umask",
            "setfacl or python3 not installed",
        );
        return;
    }
    let d = Dual::new("dacl");
    let out = d.run(
        "umask 027 && mkdir n && touch n/plain && mkdir n/pd && mkfifo n/fifo && \
         setfacl -d -m u:1000:rwx etc && umask 022 && \
         touch etc/new && mkdir etc/newdir && mkfifo etc/newfifo && \
         rm etc/app.conf && touch etc/app.conf && rm -r etc/conf.d && mkdir etc/conf.d && \
         umask 002 && python3 -c 'import os\nfor p, m in ((\"etc/suid\", 0o6775), (\"n/suid\", 0o6777)): os.close(os.open(p, os.O_CREAT | os.O_WRONLY, m))' && \
         chmod g+s etc && mkdir etc/sg n/sg && \
         stat -c '%a %n' n/* etc/new etc/newdir etc/newfifo etc/app.conf etc/conf.d etc/suid etc/sg && \
         getfacl -cn etc/new etc/newdir etc/app.conf etc/conf.d etc/suid etc/sg",
    );
    for line in [
        "640 n/plain",
        "750 n/pd",
        "6775 n/suid",
        "664 etc/new",
        "775 etc/conf.d",
        "2775 etc/sg",
        "mask::rw-",
        "default:user:1000:rwx",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "no line {line:?} in:\n{out}"
        );
    }
    d.assert_same("after default-ACL scenario", &scen_opts());
}

/// `open(dir, O_TMPFILE)` then `linkat(fd, "", …, AT_EMPTY_PATH)`, as root and as a user under
/// umask 027 in a setgid dir, and in a directory of the lower layer (copied up for it): the same
/// modes, owners, link counts, names and contents as on kernel overlayfs; an unnamed file closed
/// without a link leaves nothing.
#[test]
fn scenario_o_tmpfile() {
    if !can_mount("scenario_o_tmpfile") {
        return;
    }
    if !have_program("setpriv") || !Path::new("/usr/bin/python3").exists() {
        skip(
            "scenario_o_tmpfile",
            "setpriv or /usr/bin/python3 not installed",
        );
        return;
    }
    let d = Dual::new("tmpfile");
    let py = d.fix.path().join("tmpfile.py");
    std::fs::write(
        &py,
        r#"import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
d, tag = sys.argv[1], sys.argv[2]
fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o664)
os.write(fd, b"data " + tag.encode())
st = os.fstat(fd)
print(tag, "before", st.st_nlink, oct(st.st_mode), st.st_uid, st.st_gid)
if libc.linkat(fd, b"", -100, ("%s/linked-%s" % (d, tag)).encode(), 0x1000) != 0:
    print(tag, "linkat:", os.strerror(ctypes.get_errno()))
st = os.fstat(fd)
print(tag, "after", st.st_nlink)
os.close(fd)
fd = os.open(d, os.O_TMPFILE | os.O_WRONLY, 0o600)
os.write(fd, b"gone")
os.close(fd)
print(tag, sorted(os.listdir(d)))
"#,
    )
    .expect("write the script");
    // The script goes by value: the fixture dir is root's alone, and so may be root's python3.
    let py = py.display();
    let out = d.run(&format!(
        "py=\"$(cat {py})\" && mkdir -p t/g && chown 0:1002 t/g && chmod 2777 t/g && \
         /usr/bin/python3 -c \"$py\" . root && /usr/bin/python3 -c \"$py\" proj/docs lower && \
         (umask 027 && setpriv --reuid 1000 --regid 1001 --clear-groups \
            /usr/bin/python3 -c \"$py\" t/g user) && \
         cat linked-root proj/docs/linked-lower t/g/linked-user && echo && \
         stat -c '%n %a %u:%g %h' linked-root proj/docs/linked-lower t/g/linked-user"
    ));
    assert!(out.contains("root after 1"), "{out}");
    assert!(
        out.contains("t/g/linked-user 640 1000:1002 1"),
        "the user's file: umask 027 applied, the setgid dir's group: {out}"
    );
    d.assert_same("after O_TMPFILE", &scen_opts());
    d.assert_cross_mounts("scenario_o_tmpfile", &scen_opts());
}
