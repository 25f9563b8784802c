//! Host bindings for `plugins/wit` (`expeditor:sink/sink@0.1.0`).

wasmtime::component::bindgen!({
    path: "../../plugins/wit",
    world: "sink",
});

// `event` and `delivery-error` are `use`d by the world, so they are at the
// root already.
pub use expeditor::sink::types::Level;
