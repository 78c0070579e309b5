/*
 * C test of the jointdiff library, built with gcc against include/jointdiff.h and the static library by
 * frontends/capi/tests/c_program.rs (which also compares its output with `jointdiff denoise`).
 *
 *   test_capi MODEL NGF Y.raw N C H W STEPS SIGNAL_OUT.raw NOISE_OUT.raw
 *
 * MODEL is a 1-channel reference NCSNv2 checkpoint with NGF base features.
 * Y.raw holds N*C*H*W float32 measurements y = 0.5 x + 0.5 n. The program checks the API's version, every
 * error path, cancellation, two threads sharing one model, then writes the denoised signal and noise of a
 * run (scale:0.5, alpha 0.5, STEPS steps, seed 9, MODEL as signal and noise prior) to the two outputs.
 */
#include "jointdiff.h"
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int passed = 0, failed = 0;

#define CHECK(cond, msg)                                                               \
  do {                                                                                 \
    if (cond) {                                                                        \
      passed++;                                                                        \
    } else {                                                                           \
      failed++;                                                                        \
      fprintf(stderr, "FAIL %s:%d: %s (last error: %s)\n", __FILE__, __LINE__, msg,    \
              jd_last_error());                                                        \
    }                                                                                  \
  } while (0)

/* the call returned `want` and the thread's last error mentions `needle` */
static void expect(jd_status got, jd_status want, const char *needle, const char *what) {
  int ok = got == want && (needle == NULL || strstr(jd_last_error(), needle) != NULL);
  if (!ok) fprintf(stderr, "  %s: status %d (want %d), message '%s' (want '%s')\n", what, (int)got,
                   (int)want, jd_last_error(), needle ? needle : "");
  CHECK(ok, what);
}

static unsigned char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  unsigned char *buf = malloc((size_t)n);
  if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
    free(buf);
    buf = NULL;
  }
  fclose(f);
  *len = (size_t)n;
  return buf;
}

static int write_file(const char *path, const void *data, size_t len) {
  FILE *f = fopen(path, "wb");
  if (!f) return 0;
  size_t w = fwrite(data, 1, len, f);
  fclose(f);
  return w == len;
}

static int cancel_after_two(void *user, uint32_t done, uint32_t total) {
  (void)total;
  *(int *)user += 1;
  return done >= 2; /* non-zero: cancel */
}

static int count_only(void *user, uint32_t done, uint32_t total) {
  (void)done;
  (void)total;
  *(int *)user += 1;
  return 0;
}

typedef struct {
  const jd_model *model;
  const float *y;
  size_t n, c, h, w;
  uint32_t steps;
  float *signal;
  jd_status status;
} job;

static jd_status configure(jd_session *s, const jd_model *m, uint32_t steps) {
  jd_status st;
  if ((st = jd_session_set_signal_model(s, m)) != JD_OK) return st;
  if ((st = jd_session_set_noise_model(s, m)) != JD_OK) return st;
  if ((st = jd_session_set_operator_scale(s, 0.5f)) != JD_OK) return st;
  if ((st = jd_session_set_alpha(s, 0.5)) != JD_OK) return st;
  /* projection with one sample (the defaults are pigdm and two samples) */
  if ((st = jd_session_set_rule(s, JD_RULE_PROJECTION)) != JD_OK) return st;
  if ((st = jd_session_set_samples(s, 1)) != JD_OK) return st;
  return jd_session_set_steps(s, steps);
}

static void *worker(void *arg) {
  job *j = arg;
  jd_session *s = NULL;
  j->status = jd_session_create(&s);
  if (j->status == JD_OK) j->status = configure(s, j->model, j->steps);
  if (j->status == JD_OK)
    j->status = jd_denoise(s, j->y, j->n, j->c, j->h, j->w, 9, j->signal, j->n * j->c * j->h * j->w,
                           NULL, 0, NULL, 0);
  jd_session_destroy(&s);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 11) {
    fprintf(stderr, "usage: %s MODEL NGF Y.raw N C H W STEPS SIGNAL_OUT NOISE_OUT\n", argv[0]);
    return 2;
  }
  const char *model_path = argv[1];
  uint32_t ngf = (uint32_t)strtoul(argv[2], NULL, 10);
  size_t n = strtoul(argv[4], NULL, 10), c = strtoul(argv[5], NULL, 10);
  size_t h = strtoul(argv[6], NULL, 10), w = strtoul(argv[7], NULL, 10);
  uint32_t steps = (uint32_t)strtoul(argv[8], NULL, 10);
  size_t total = n * c * h * w, ylen = 0;
  float *y = (float *)read_file(argv[3], &ylen);
  CHECK(y != NULL && ylen == total * sizeof(float), "read measurements");
  if (!y) return 1;

  /* version */
  CHECK(jd_abi_version() == JD_ABI_VERSION, "ABI version matches the header");
  CHECK(strlen(jd_version()) > 0, "version string");

  /* loading: NULL pointers, missing file, corrupt file, truncated buffer, default models */
  jd_model *m = (jd_model *)0x1;
  expect(jd_model_load(NULL, &m), JD_ERR_NULL_POINTER, "path", "load NULL path");
  CHECK(m == NULL, "out is NULL after a failed load");
  expect(jd_model_load(model_path, NULL), JD_ERR_NULL_POINTER, "out", "load NULL out");
  expect(jd_model_load("/nonexistent/model.safetensors", &m), JD_ERR_IO, "/nonexistent/model.safetensors",
         "load missing file");
  const char *junk = "this is not a safetensors file, only text";
  char corrupt_path[] = "/tmp/jd_capi_corrupt_XXXXXX";
  int fd = mkstemp(corrupt_path);
  CHECK(fd >= 0 && write_file(corrupt_path, junk, strlen(junk)), "write corrupt file");
  expect(jd_model_load(corrupt_path, &m), JD_ERR_FORMAT, "safetensors", "load corrupt file");
  remove(corrupt_path);
  size_t blen = 0;
  unsigned char *bytes = read_file(model_path, &blen);
  CHECK(bytes != NULL, "read model bytes");
  expect(jd_model_load_buffer(bytes, blen / 2, &m), JD_ERR_FORMAT, "safetensors", "load truncated buffer");
  expect(jd_model_load_buffer(NULL, 10, &m), JD_ERR_NULL_POINTER, "data", "load NULL buffer");
  /* the embedded default models: 28x28x1 NCSNv2 ngf 32 with jointdiff metadata */
  for (int which = JD_DEFAULT_SIGNAL; which <= JD_DEFAULT_NOISE; which++) {
    jd_model *dm = NULL;
    jd_model_info di;
    expect(jd_model_default(which, &dm), JD_OK, NULL, "default model");
    expect(jd_model_get_info(dm, &di), JD_OK, NULL, "default model info");
    CHECK(di.channels == 1 && di.ngf == 32 && di.height == 28 && di.width == 28 && di.reference_checkpoint == 0,
          "default model is 28x28x1 ngf 32");
    jd_model_destroy(&dm);
    CHECK(dm == NULL, "destroy nulls the default model");
  }
  expect(jd_model_default(JD_DEFAULT_SIGNAL, NULL), JD_ERR_NULL_POINTER, "out", "default model NULL out");
  expect(jd_model_default(7, &m), JD_ERR_INVALID_ARGUMENT, "unknown", "bad default model id");

  /* a good load, from a path and from memory */
  jd_model *model = NULL, *model2 = NULL;
  expect(jd_model_load(model_path, &model), JD_OK, NULL, "load model");
  expect(jd_model_load_buffer(bytes, blen, &model2), JD_OK, NULL, "load model from buffer");
  free(bytes);
  jd_model_info info;
  expect(jd_model_get_info(model2, &info), JD_OK, NULL, "model info");
  CHECK(info.channels == 1 && info.ngf == ngf && info.reference_checkpoint == 1, "model info values");
  expect(jd_model_get_info(NULL, &info), JD_ERR_NULL_POINTER, "model", "info NULL model");
  jd_model_destroy(&model2);
  CHECK(model2 == NULL, "destroy nulls the pointer");
  jd_model_destroy(&model2); /* no-op */
  jd_model_destroy(NULL);    /* no-op */

  /* session configuration errors */
  jd_session *s = NULL;
  expect(jd_session_create(&s), JD_OK, NULL, "session create");
  float *sig = calloc(total, sizeof(float)), *noi = calloc(total, sizeof(float));
  expect(jd_denoise(s, y, n, c, h, w, 9, sig, total, NULL, 0, NULL, 0), JD_ERR_INVALID_ARGUMENT,
         "signal model", "denoise without models");
  expect(configure(s, model, steps), JD_OK, NULL, "configure");
  expect(jd_session_set_steps(s, 0), JD_ERR_INVALID_ARGUMENT, "steps", "steps 0");
  expect(jd_session_set_lambda(s, -1.0), JD_ERR_INVALID_ARGUMENT, "lambda", "negative lambda");
  expect(jd_session_set_mu(s, NAN), JD_ERR_INVALID_ARGUMENT, "mu", "NaN mu");
  expect(jd_session_set_rule(s, 7), JD_ERR_INVALID_ARGUMENT, "rule", "unknown rule");
  expect(jd_session_set_rule(s, JD_RULE_PIGDM), JD_OK, NULL, "pigdm rule");
  expect(jd_session_set_rule(s, JD_RULE_PROJECTION), JD_OK, NULL, "back to projection");
  expect(jd_session_set_backend(s, 7), JD_ERR_INVALID_ARGUMENT, "backend", "unknown backend");
  expect(jd_session_set_sde(s, 99), JD_ERR_INVALID_ARGUMENT, "sde", "unknown sde");
  expect(jd_session_set_noise_gaussian(s, -0.1f, 0.0f), JD_ERR_INVALID_ARGUMENT, "std", "negative std");
  expect(jd_session_set_signal_model(NULL, model), JD_ERR_NULL_POINTER, "session", "NULL session");
  expect(jd_session_set_signal_model(s, NULL), JD_ERR_NULL_POINTER, "model", "NULL model");

  /* denoise errors: pointers, sizes, shapes, NaN */
  expect(jd_denoise(s, NULL, n, c, h, w, 9, sig, total, NULL, 0, NULL, 0), JD_ERR_NULL_POINTER, "y",
         "NULL y");
  expect(jd_denoise(s, y, n, c, h, w, 9, NULL, total, NULL, 0, NULL, 0), JD_ERR_NULL_POINTER,
         "signal_out", "NULL signal_out");
  expect(jd_denoise(s, y, n, c, h, w, 9, sig, total - 1, NULL, 0, NULL, 0), JD_ERR_INVALID_ARGUMENT,
         "signal_len", "short signal buffer");
  expect(jd_denoise(s, y, n, c, h, w, 9, sig, total, noi, total + 1, NULL, 0), JD_ERR_INVALID_ARGUMENT,
         "noise_len", "wrong noise buffer");
  expect(jd_denoise(s, y, n, c, h, w, 9, sig, total, NULL, 0, noi, total), JD_ERR_INVALID_ARGUMENT,
         "samples", "std_out without samples");
  expect(jd_denoise(s, y, 1, 3, h, w / 3, 9, sig, h * (w / 3) * 3, NULL, 0, NULL, 0), JD_ERR_SHAPE,
         "channel", "channel mismatch");
  expect(jd_denoise(s, y, 1, 1, 27, 27, 9, sig, 27 * 27, NULL, 0, NULL, 0), JD_ERR_SHAPE, "27x27",
         "odd image size");
  expect(jd_denoise(s, y, 0, c, h, w, 9, sig, total, NULL, 0, NULL, 0), JD_ERR_INVALID_ARGUMENT, "empty",
         "empty batch");
  float *ynan = malloc(total * sizeof(float));
  memcpy(ynan, y, total * sizeof(float));
  ynan[5] = NAN;
  expect(jd_denoise(s, ynan, n, c, h, w, 9, sig, total, NULL, 0, NULL, 0), JD_ERR_NON_FINITE, "not finite",
         "NaN measurement");
  ynan[5] = INFINITY;
  expect(jd_denoise(s, ynan, n, c, h, w, 9, sig, total, NULL, 0, NULL, 0), JD_ERR_NON_FINITE, "not finite",
         "Inf measurement");
  free(ynan);
  size_t need = 0;
  expect(jd_denoise_signal_len(s, n, c, h, w, &need), JD_OK, NULL, "signal length");
  CHECK(need == total, "signal length value");

  /* cancel from the callback */
  int calls = 0;
  expect(jd_session_set_progress(s, cancel_after_two, &calls), JD_OK, NULL, "set progress");
  expect(jd_denoise(s, y, n, c, h, w, 9, sig, total, NULL, 0, NULL, 0), JD_ERR_CANCELLED, "cancel",
         "cancel from the callback");
  CHECK(calls == 2, "callback called twice before cancelling");
  calls = 0;
  expect(jd_session_set_progress(s, count_only, &calls), JD_OK, NULL, "set counting progress");

  /* the full run whose output the Rust test compares with `jointdiff denoise` */
  expect(jd_denoise(s, y, n, c, h, w, 9, sig, total, noi, total, NULL, 0), JD_OK, NULL, "denoise");
  CHECK(calls == (int)steps, "one callback per step");
  int finite = 1;
  for (size_t i = 0; i < total; i++) finite &= isfinite(sig[i]) && isfinite(noi[i]);
  CHECK(finite, "finite output");
  CHECK(write_file(argv[9], sig, total * sizeof(float)), "write signal");
  CHECK(write_file(argv[10], noi, total * sizeof(float)), "write noise");

  /* the reference backend agrees with the CPU backend within float tolerance */
  float *ref = calloc(total, sizeof(float));
  expect(jd_session_set_backend(s, JD_BACKEND_REFERENCE), JD_OK, NULL, "reference backend");
  expect(jd_denoise(s, y, n, c, h, w, 9, ref, total, NULL, 0, NULL, 0), JD_OK, NULL, "reference denoise");
  float maxdiff = 0;
  for (size_t i = 0; i < total; i++) maxdiff = fmaxf(maxdiff, fabsf(ref[i] - sig[i]));
  CHECK(maxdiff < 1e-3f, "reference and cpu backends agree");
  free(ref);
  expect(jd_session_set_backend(s, JD_BACKEND_CPU), JD_OK, NULL, "cpu backend");

  /* the wgpu backend: one denoise checked against the CPU backend's (skipped under valgrind) */
  if (getenv("JD_TEST_SKIP_GPU") == NULL) {
    jd_status gs = jd_session_set_backend(s, JD_BACKEND_WGPU);
    if (gs == JD_OK) {
      float *gsig = calloc(total, sizeof(float));
      expect(jd_denoise(s, y, n, c, h, w, 9, gsig, total, NULL, 0, NULL, 0), JD_OK, NULL, "wgpu denoise");
      double mse = 0;
      for (size_t i = 0; i < total; i++) mse += ((double)gsig[i] - sig[i]) * ((double)gsig[i] - sig[i]);
      mse /= (double)total;
      double psnr = mse > 0 ? 10.0 * log10(1.0 / mse) : INFINITY;
      printf("wgpu vs cpu: PSNR %.1f dB\n", psnr);
      CHECK(psnr > 40.0, "wgpu and cpu backends agree (PSNR > 40 dB)");
      free(gsig);
      expect(jd_session_set_backend(s, JD_BACKEND_CPU), JD_OK, NULL, "back to the cpu backend");
    } else {
      CHECK(gs == JD_ERR_UNAVAILABLE, "wgpu is available or JD_ERR_UNAVAILABLE");
      fprintf(stderr, "\n*** NO WGPU ADAPTER: the C wgpu check did not run (%s) ***\n\n", jd_last_error());
      const char *req = getenv("JOINTDIFF_REQUIRE_GPU");
      CHECK(!(req && strcmp(req, "1") == 0), "JOINTDIFF_REQUIRE_GPU=1 needs a wgpu adapter");
    }
  }

  /* two threads share one model, each with its own session: both equal the single-thread result */
  job jobs[2];
  pthread_t th[2];
  for (int k = 0; k < 2; k++) {
    jobs[k] = (job){model, y, n, c, h, w, steps, calloc(total, sizeof(float)), JD_ERR_INTERNAL};
    CHECK(pthread_create(&th[k], NULL, worker, &jobs[k]) == 0, "start thread");
  }
  for (int k = 0; k < 2; k++) {
    pthread_join(th[k], NULL);
    CHECK(jobs[k].status == JD_OK, "thread denoise");
    CHECK(memcmp(jobs[k].signal, sig, total * sizeof(float)) == 0, "thread output equals single-thread");
    free(jobs[k].signal);
  }

  /* the session keeps the model alive after the caller destroys its handle */
  jd_model_destroy(&model);
  expect(jd_denoise(s, y, n, c, h, w, 9, noi, total, NULL, 0, NULL, 0), JD_OK, NULL,
         "denoise after model handle destroyed");
  CHECK(memcmp(noi, sig, total * sizeof(float)) == 0, "same result again");
  jd_session_destroy(&s);
  CHECK(s == NULL, "session destroy nulls the pointer");
  jd_session_destroy(&s);

  free(sig);
  free(noi);
  free(y);
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
