// E2B's JavaScript SDK (npm `e2b`, the version tests/run pins), unmodified, against
// `banger e2b serve`: one create, commands, files, kill. Run by tests/e2b.rs with
// E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY set; E2B_JS names where tests/run installed
// the package. Each step prints `ok: <what>`; a failure throws (exit status 1).
import assert from 'node:assert/strict'

const { Sandbox, CommandExitError } = await import(
  `${process.env.E2B_JS}/node_modules/e2b/dist/index.mjs`
)
const template = process.argv[2]
const ok = (what) => console.log(`ok: ${what}`)

const sbx = await Sandbox.create(template, { timeoutMs: 600_000, metadata: { sdk: 'js' } })
ok(`create ${sbx.sandboxId}`)

const r = await sbx.commands.run('echo from-js; whoami')
assert.equal(r.stdout, 'from-js\nuser\n')
await assert.rejects(sbx.commands.run('exit 4'), (e) => e instanceof CommandExitError && e.exitCode === 4)
let streamed = ''
await sbx.commands.run('for i in 1 2 3; do echo $i; done', { onStdout: (d) => { streamed += d } })
assert.equal(streamed, '1\n2\n3\n')
ok('commands: output, exit code, streamed output')

await sbx.files.write('/home/user/js.txt', 'written by js')
assert.equal(await sbx.files.read('/home/user/js.txt'), 'written by js')
const names = (await sbx.files.list('/home/user')).map((e) => e.name)
assert.ok(names.includes('js.txt'), names.join(','))
assert.equal(await sbx.files.exists('/home/user/nope'), false)
ok('files: write, read, list, exists')

const listed = await Sandbox.list({ query: { metadata: { sdk: 'js' } } }).nextItems()
assert.deepEqual(listed.map((s) => s.sandboxId), [sbx.sandboxId])
await sbx.kill()
assert.equal((await Sandbox.list({ query: { metadata: { sdk: 'js' } } }).nextItems()).length, 0)
ok('list by metadata, kill')
