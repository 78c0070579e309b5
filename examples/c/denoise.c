/*
 * Minimal use of the jointdiff C library: take a score model (the embedded default signal model, or a file),
 * denoise measurements read from an .npy file, report progress, write the estimate as raw float32.
 *
 *   cargo build --release -p jointdiff-capi
 *   gcc -O2 examples/c/denoise.c -Ifrontends/capi/include target/release/libjointdiff.a -lpthread -ldl -lm -o denoise
 *   ./denoise [MODEL.safetensors|-] [Y.npy] [OUT.raw]
 *
 * Defaults: the embedded Fashion-MNIST signal model (jd_model_default), the stripe-noise fixture (Fashion-MNIST
 * test images plus stripes of std 0.2), denoised.raw. The noise prior is white Gaussian (the non-joint
 * baseline); jd_model_default(JD_DEFAULT_NOISE, ...) gives the embedded digit model for digit overlays.
 */
#include "jointdiff.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Reads a little-endian float32 C-order .npy file with 4 dimensions (N, C, H, W). */
static float *read_npy(const char *path, size_t shape[4]) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  unsigned char head[10];
  float *data = NULL;
  if (fread(head, 1, 10, f) == 10 && memcmp(head, "\x93NUMPY", 6) == 0 && head[6] == 1) {
    size_t hlen = head[8] | (size_t)head[9] << 8;
    char *hdr = calloc(hlen + 1, 1);
    if (hdr && fread(hdr, 1, hlen, f) == hlen && strstr(hdr, "'<f4'")) {
      char *s = strstr(hdr, "'shape': (");
      if (s && sscanf(s, "'shape': (%zu, %zu, %zu, %zu)", &shape[0], &shape[1], &shape[2], &shape[3]) == 4) {
        size_t n = shape[0] * shape[1] * shape[2] * shape[3];
        data = malloc(n * sizeof(float));
        if (data && fread(data, sizeof(float), n, f) != n) {
          free(data);
          data = NULL;
        }
      }
    }
    free(hdr);
  }
  fclose(f);
  return data;
}

static int on_progress(void *user, uint32_t done, uint32_t total) {
  (void)user;
  if (done % 10 == 0 || done == total) fprintf(stderr, "\rstep %u/%u", done, total);
  if (done == total) fprintf(stderr, "\n");
  return 0; /* 0: continue */
}

static int fail(const char *what, jd_status st) {
  fprintf(stderr, "%s failed (status %d): %s\n", what, (int)st, jd_last_error());
  return 1;
}

int main(int argc, char **argv) {
  const char *model_path = argc > 1 && strcmp(argv[1], "-") != 0 ? argv[1] : NULL; /* "-": the default */
  const char *y_path = argc > 2 ? argv[2] : "fixtures/data/fashion_t10k_16_sine02.npy";
  const char *out_path = argc > 3 ? argv[3] : "denoised.raw";
  printf("jointdiff %s (ABI %u)\n", jd_version(), jd_abi_version());

  size_t shape[4];
  float *y = read_npy(y_path, shape);
  if (!y) {
    fprintf(stderr, "%s: cannot read a float32 NCHW .npy\n", y_path);
    return 1;
  }
  jd_model *model = NULL;
  jd_session *session = NULL;
  jd_status st;
  st = model_path ? jd_model_load(model_path, &model) : jd_model_default(JD_DEFAULT_SIGNAL, &model);
  if (st != JD_OK) return fail(model_path ? "jd_model_load" : "jd_model_default", st);
  if ((st = jd_session_create(&session)) != JD_OK) return fail("jd_session_create", st);
  /* signal prior: the model; noise prior: white Gaussian of std 0.2 (the non-joint baseline) */
  if ((st = jd_session_set_signal_model(session, model)) != JD_OK) return fail("set_signal_model", st);
  if ((st = jd_session_set_noise_gaussian(session, 0.2f, 0.0f)) != JD_OK) return fail("set_noise", st);
  if ((st = jd_session_set_steps(session, 100)) != JD_OK) return fail("set_steps", st);
  if ((st = jd_session_set_progress(session, on_progress, NULL)) != JD_OK) return fail("set_progress", st);

  size_t n = shape[0] < 4 ? shape[0] : 4, len = 0; /* the first four measurements */
  if ((st = jd_denoise_signal_len(session, n, shape[1], shape[2], shape[3], &len)) != JD_OK)
    return fail("jd_denoise_signal_len", st);
  float *x = malloc(len * sizeof(float));
  st = jd_denoise(session, y, n, shape[1], shape[2], shape[3], 42, x, len, NULL, 0, NULL, 0);
  if (st != JD_OK) return fail("jd_denoise", st);

  double mean = 0;
  for (size_t i = 0; i < len; i++) mean += x[i];
  printf("denoised %zu image(s) of %zux%zux%zu, mean value %.4f -> %s\n", n, shape[1], shape[2], shape[3],
         mean / (double)len, out_path);
  FILE *f = fopen(out_path, "wb");
  if (f) {
    fwrite(x, sizeof(float), len, f);
    fclose(f);
  }
  jd_session_destroy(&session); /* sets session to NULL */
  jd_model_destroy(&model);
  free(x);
  free(y);
  return 0;
}
