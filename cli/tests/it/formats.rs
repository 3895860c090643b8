//! Old repositories stay readable (format rule 8): a repository written by
//! an earlier revision of the format is checked in under `tests/fixtures/`
//! and must list, verify and restore byte for byte with today's binary, and
//! take new backups beside its old ones.

use crate::Env;
use std::path::Path;

/// Written by 27f06e6 (`write_the_v1_random_nonce_fixture`): chunk
/// envelopes and sealed objects encrypted under the data key itself with
/// random nonces, before per-stage subkeys.
const V1_RANDOM_NONCES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/repo-v1-random-nonces"
);

/// The tree every fixture holds: text, incompressible bytes over several
/// chunks, compressible pages and an empty file.
fn fixture_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub")).expect("mkdir");
    std::fs::write(
        root.join("hello.txt"),
        "pg_hardstorage fixture\n".repeat(100),
    )
    .expect("w");
    let random = pg_hardstorage_testkit::tree::Rng::new(7).bytes(40_000);
    std::fs::write(root.join("random.bin"), random).expect("w");
    let pages: Vec<u8> = (0..20u8).flat_map(|i| [b'A' + i % 2; 4096]).collect();
    std::fs::write(root.join("sub/pages.dat"), pages).expect("w");
    std::fs::write(root.join("empty"), b"").expect("w");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read fixture") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).expect("copy");
        }
    }
}

fn same_file(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).expect("a"), std::fs::read(b).expect("b"));
    assert!(x == y, "{} differs from {}", a.display(), b.display());
}

/// Regenerates a fixture with the binary under test: run it only on the
/// commit whose format the fixture is meant to capture, e.g.
/// `PHS_FIXTURE_OUT=cli/tests/fixtures/NAME cargo test -p pg_hardstorage_cli
/// --test it write_the_v1 -- --ignored`.
#[test]
#[ignore = "writes a format fixture; run only on the commit it captures"]
fn write_the_v1_random_nonce_fixture() {
    let out = std::path::PathBuf::from(std::env::var("PHS_FIXTURE_OUT").expect("PHS_FIXTURE_OUT"));
    let env = Env::new();
    let src = env.path("src");
    fixture_tree(&src);
    env.ok(&["repo", "init", "--chunk-size", "4096,16384,65536"]);
    env.ok(&[
        "deployment",
        "create",
        "fixture",
        "--path",
        src.to_str().expect("utf8"),
    ]);
    env.backup_id("fixture");
    copy_dir(&env.repo(), &out);
}

#[test]
fn a_repository_of_random_nonce_envelopes_still_verifies_and_restores() {
    let env = Env::new();
    copy_dir(Path::new(V1_RANDOM_NONCES), &env.repo());
    let expected = env.path("expected");
    fixture_tree(&expected);

    let list = env.ok(&["backup", "list"]);
    let old = list[0]["backup_id"]
        .as_str()
        .expect("one old backup")
        .to_string();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let (code, v) = env.json(&["backup", "verify", &old]);
    assert_eq!(code, 0, "{v}");
    let target = env.path("restored");
    env.ok(&[
        "restore",
        "fixture",
        "--backup",
        &old,
        "--target",
        target.to_str().expect("utf8"),
    ]);
    for f in ["hello.txt", "random.bin", "sub/pages.dat", "empty"] {
        same_file(&expected.join(f), &target.join(f));
    }

    // A new backup (today's envelopes) beside the old one: both restore.
    let d = env.ok(&[
        "deployment",
        "create",
        "today",
        "--path",
        expected.to_str().expect("utf8"),
    ]);
    assert_eq!(d["created"], true, "{d}");
    let new = env.backup_id("today");
    let again = env.path("restored-today");
    env.ok(&[
        "restore",
        "today",
        "--backup",
        &new,
        "--target",
        again.to_str().expect("utf8"),
    ]);
    for f in ["hello.txt", "random.bin", "sub/pages.dat", "empty"] {
        same_file(&expected.join(f), &again.join(f));
    }
    let (code, v) = env.json(&["repo", "check"]);
    assert_eq!(code, 0, "{v}");
}
