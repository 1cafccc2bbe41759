// llama.cpp (node-llama-cpp's prebuilt CPU build, nothing compiled) for tests/test_gguf.py.
//
//   node run.mjs job.json result.json
//   node run.mjs --check         (exits 0 once llama.cpp has loaded)
//
// job.json: {"threads": 1, "runs": [{"model": "base.gguf", "adapter": "lora.gguf" or null, "scale": 1,
//            "prompts": [[token ids], ...], "new_tokens": 12, "eos": 2, "logits": true}, ...]}
// result.json: one entry per run: {"answers": [[greedy token ids, up to and with eos], ...],
//              "logits": [base64 float32 logits at each prompt's last position, ...] (when asked)}
// Greedy decoding is llama.cpp's sampler at temperature 0; each prompt runs on its own
// sequence of the context, from position 0. A model file is loaded once for all the runs that use it.
import fs from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const [jobPath, resultPath] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
if (jobPath === "--check") process.exit(0);
const job = JSON.parse(fs.readFileSync(jobPath, "utf8"));
const models = new Map();
const results = [];

function toArray(logits) {
    // logits: Map token -> logit over the whole vocabulary (sorted by logit, not by token).
    const array = new Float32Array(logits.size);
    for (const [token, logit] of logits) array[token] = logit;
    return Buffer.from(array.buffer).toString("base64");
}

for (const run of job.runs) {
    if (!models.has(run.model)) models.set(run.model, await llama.loadModel({modelPath: run.model}));
    const model = models.get(run.model);
    const longest = Math.max(...run.prompts.map((p) => p.length));
    const context = await model.createContext({
        sequences: run.prompts.length,
        contextSize: run.prompts.length * (longest + run.new_tokens + 8),
        threads: job.threads ?? 1,
        lora: run.adapter == null ? undefined : {adapters: [{filePath: run.adapter, scale: run.scale ?? 1}]},
    });
    const answers = [], logits = [];
    for (const prompt of run.prompts) {
        const sequence = context.getSequence();
        // The last token of `tokens` asks for the next one, sampled greedily (temperature 0, no penalties).
        const last = (tokens, full) => [...tokens.slice(0, -1), [tokens.at(-1), {generateNext: {
            token: true, options: {temperature: 0}, logits: full}}]];
        let next = (await sequence.controlledEvaluate(last(prompt, run.logits))).at(-1).next;
        if (run.logits) logits.push(toArray(next.logits));
        const answer = [];
        while (answer.length < run.new_tokens) {
            answer.push(next.token);
            if (next.token === run.eos) break;
            next = (await sequence.controlledEvaluate(last([next.token], false))).at(-1).next;
        }
        answers.push(answer);
        sequence.dispose();
    }
    await context.dispose();
    results.push(run.logits ? {answers, logits} : {answers});
}
for (const model of models.values()) await model.dispose();
fs.writeFileSync(resultPath, JSON.stringify(results));
await llama.dispose();
