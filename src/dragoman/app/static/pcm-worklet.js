// AudioWorklet processor for the Dragoman web client: collects mono float samples at the
// context's rate and posts them to the main thread in batches (resampling to 16 kHz and int16
// conversion happen there). The node is created with channelCount 1 / "explicit", so the
// browser has already down-mixed the microphone to mono.

class DragomanPcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const batch = (options && options.processorOptions && options.processorOptions.batch) || 2048;
    this.buffer = new Float32Array(batch);
    this.filled = 0;
    this.port.onmessage = (event) => {
      if (event.data && event.data.type === "flush") {
        this.post();
        this.port.postMessage({ type: "flushed" });
      }
    };
  }

  post() {
    if (this.filled === 0) return;
    const samples = this.buffer.slice(0, this.filled);
    this.filled = 0;
    this.port.postMessage({ type: "audio", samples }, [samples.buffer]);
  }

  process(inputs) {
    const input = inputs[0];
    const channel = input && input[0];
    if (channel) {
      let offset = 0;
      while (offset < channel.length) {
        const n = Math.min(channel.length - offset, this.buffer.length - this.filled);
        this.buffer.set(channel.subarray(offset, offset + n), this.filled);
        this.filled += n;
        offset += n;
        if (this.filled === this.buffer.length) this.post();
      }
    }
    return true; // keep running while connected, even through silent/absent input
  }
}

registerProcessor("dragoman-pcm-capture", DragomanPcmCapture);
