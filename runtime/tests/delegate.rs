//! The NPU delegate slot: `auto` asks registered delegates first, in order, and passes
//! over those that cannot run here.

use std::sync::Arc;

use kiln_runtime::{open_backend, register_delegate, Backend, BackendChoice, CpuBackend, Delegate};

/// A stand-in accelerator: runs on the CPU backend, or refuses.
struct FakeNpu {
    name: &'static str,
    works: bool,
}

impl Delegate for FakeNpu {
    fn name(&self) -> String {
        self.name.into()
    }

    fn open(&self) -> Result<Box<dyn Backend>, String> {
        if self.works {
            Ok(Box::new(CpuBackend::new(Some(1))))
        } else {
            Err("no such device".into())
        }
    }
}

#[test]
fn auto_asks_delegates_first() {
    register_delegate(Arc::new(FakeNpu {
        name: "working npu",
        works: true,
    }));
    register_delegate(Arc::new(FakeNpu {
        name: "absent npu",
        works: false,
    }));
    let (_, reason) = open_backend(BackendChoice::Auto, Some(1)).unwrap();
    assert_eq!(reason, "delegate: working npu");
    // An explicit choice never goes to a delegate.
    let (backend, reason) = open_backend(BackendChoice::Cpu, Some(1)).unwrap();
    assert_eq!(backend.name(), "cpu");
    assert!(reason.starts_with("cpu"), "{reason}");
}
